"""Backbones and heads: shapes, strides, parameter counts, dropout, initialisation, sharded training."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from affinity_jax import constants
from affinity_jax.errors import UserError
from affinity_jax.models import AffinityNet, CAMNet, FrozenStat, SegNet, build_backbone
from affinity_jax.models import layers

BACKBONES = ("tiny", "lite0", "vgg16", "resnet38")
HEADS = (CAMNet, AffinityNet, SegNet)
CHANNELS = {"tiny": 128, "lite0": 1280, "vgg16": 1024, "resnet38": 4096}
LEVELS = {"tiny": (32, 64, 128), "lite0": (80, 192, 1280), "vgg16": (512, 512, 1024),
          "resnet38": (512, 1024, 4096)}


def _abstract(fn):
  return nnx.eval_shape(fn)


def _shapes(model, size, train=False):
  x = jax.ShapeDtypeStruct((2, *size, 3), jnp.float32)
  out = nnx.eval_shape(lambda m, x: m(x, train=train, key=jax.random.key(0)), model, x)
  return jax.tree.map(lambda a: a.shape, out)


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("size", [(448, 448), (375, 500), (376, 504)])
def test_backbone_shapes_and_levels(name, size):
  bb = _abstract(lambda: build_backbone(name, rngs=nnx.Rngs(0)))
  h, w = math.ceil(size[0] / 8), math.ceil(size[1] / 8)
  feats, aux = _shapes(bb, size)
  assert feats == (2, h, w, CHANNELS[name]) and bb.out_channels == CHANNELS[name]
  assert bb.level_channels == LEVELS[name]
  for level, c in zip(("low", "mid", "high"), LEVELS[name]):
    assert aux[level] == (2, h, w, c)
  assert bb.normalization == ("caffe_bgr" if name == "vgg16" else "imagenet_rgb")


def test_lite0_level_stages_pick_the_affinity_levels():
  bb = _abstract(lambda: build_backbone("lite0", rngs=nnx.Rngs(0), level_stages=(2, 4)))
  assert bb.level_channels == (40, 112, 1280)
  _, aux = _shapes(bb, (96, 128))
  assert aux["low"] == (2, 12, 16, 40) and aux["mid"] == (2, 12, 16, 112)
  aff = _abstract(lambda: AffinityNet("lite0", rngs=nnx.Rngs(0), level_stages=(2, 4)))
  assert aff.f8_3.kernel.shape[-2:] == (40, 64)
  with pytest.raises(UserError, match="level_stages"):
    build_backbone("lite0", rngs=nnx.Rngs(0), level_stages=(5, 2))


@pytest.mark.parametrize("name", BACKBONES)
def test_head_shapes(name):
  size = (375, 500)
  cam = _abstract(lambda: CAMNet(name, rngs=nnx.Rngs(0)))
  logits, aux = _shapes(cam, size, train=True)
  assert logits == (2, 20) and aux["cams"] == (2, 47, 63, 20)
  assert aux["features"] == (2, 47, 63, CHANNELS[name])
  aff = _abstract(lambda: AffinityNet(name, rngs=nnx.Rngs(0)))
  emb, _ = _shapes(aff, (448, 448))
  assert emb == (2, 56, 56, 448)
  seg = _abstract(lambda: SegNet(name, rngs=nnx.Rngs(0)))
  logits, aux = _shapes(seg, size)
  assert logits == (2, 375, 500, 21) and aux["logits_small"] == (2, 47, 63, 21)


def _count(model, *types):
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Any(*types))))


def test_resnet38_parameter_count_matches_reference():
  # The reference counts conv weights and BatchNorm weight/bias (not running statistics).
  aff = _abstract(lambda: AffinityNet("resnet38", rngs=nnx.Rngs(0)))
  params = _count(aff, nnx.Param)
  flat = nnx.to_flat_state(nnx.state(aff, FrozenStat))
  bn_affine = sum(int(np.prod(v.value.shape)) for p, v in flat if p[-1] in ("scale", "bias"))
  total = params + bn_affine
  assert round(total / 1e6, 1) == 106.5, total
  assert total == 106_484_032
  # Head: 512*64 + 1024*128 + 4096*256 + 448*448.
  assert params - _count(aff.backbone, nnx.Param) == 1_413_120


def test_frozen_batchnorm_is_not_a_param_and_frozen_prefixes_exist():
  aff = _abstract(lambda: AffinityNet("resnet38", rngs=nnx.Rngs(0)))
  paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(aff, nnx.Param))]
  assert not any("/bn" in p for p in paths)
  for prefix in aff.backbone.frozen_prefixes:
    assert any(p.startswith(prefix + "/") for p in paths), prefix
  trainable = _abstract(lambda: build_backbone("resnet38", rngs=nnx.Rngs(0), norm="batch"))
  assert _count(trainable, nnx.BatchStat) == 47_744  # mean + var of every BatchNorm.
  with pytest.raises(UserError, match="norm"):
    build_backbone("tiny", rngs=nnx.Rngs(0), norm="nope")
  with pytest.raises(UserError, match="backbone"):
    build_backbone("resnet50", rngs=nnx.Rngs(0))


def test_frozen_batchnorm_matches_formula():
  bn = layers.FrozenBatchNorm(3, eps=1e-5)
  rng = np.random.default_rng(0)
  for var in (bn.scale, bn.bias, bn.mean):
    var.value = jnp.asarray(rng.normal(size=3), jnp.float32)
  bn.var.value = jnp.asarray(rng.uniform(0.5, 2, size=3), jnp.float32)
  x = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
  want = (x - np.asarray(bn.mean.value)) / np.sqrt(np.asarray(bn.var.value) + 1e-5)
  want = want * np.asarray(bn.scale.value) + np.asarray(bn.bias.value)
  np.testing.assert_allclose(bn(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)


# Real ResNet-38 / VGG16 / Lite0 forwards are slow on a shared CPU; their numerics are
# covered by the torch comparisons and the ImageNet test (test_weights*.py).
@pytest.mark.parametrize("name", ["tiny"])
def test_real_forward_tiny_input(name):
  bb = build_backbone(name, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 20, 28, 3))
  f, aux = nnx.jit(lambda m, x: m(x, train=False))(bb, x)
  assert f.shape == (1, 3, 4, CHANNELS[name])
  assert bool(jnp.all(jnp.isfinite(f)))
  np.testing.assert_array_equal(aux["high"], f)


def test_dropout_only_in_training_and_keyed():
  model = CAMNet("tiny", rngs=nnx.Rngs(0), width=8)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  run = nnx.jit(lambda m, x, key: m(x, train=True, key=key)[0])
  evaluate = nnx.jit(lambda m, x: m(x, train=False)[0])
  a = evaluate(model, x)
  np.testing.assert_array_equal(a, evaluate(model, x))
  k = jax.random.key(3)
  c, d, e = run(model, x, k), run(model, x, k), run(model, x, jax.random.fold_in(k, 1))
  np.testing.assert_array_equal(c, d)
  assert not np.allclose(c, e) and not np.allclose(a, c)
  own = nnx.jit(lambda m, x: m(x, train=True)[0])  # No key: the module's rng stream advances.
  assert not np.allclose(own(model, x), own(model, x))


def test_cams_are_relu_of_classifier_and_vgg_takes_sqrt():
  model = CAMNet("tiny", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 24, 32, 3))
  logits, aux = model(x, train=False)
  w = np.asarray(model.classifier.kernel.value)[0, 0]  # [D, 20]
  f = np.asarray(aux["features"])
  np.testing.assert_allclose(aux["cams"], np.maximum(f @ w, 0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(logits, f.mean(axis=(1, 2)) @ w, rtol=1e-4, atol=1e-5)
  assert model.classifier.bias is None
  vgg = _abstract(lambda: CAMNet("vgg16", rngs=nnx.Rngs(0)))
  assert vgg.sqrt_cams and not model.sqrt_cams


def test_imagenet_prior_cams_sum_the_counterparts_and_keep_person_trained():
  model = CAMNet("lite0", rngs=nnx.Rngs(0), imagenet_prior=True)
  x = jax.random.normal(jax.random.key(1), (1, 40, 48, 3))
  logits, aux = model(x, train=False)
  f = np.asarray(aux["features"], np.float64)
  fc = np.asarray(model.backbone.fc.kernel.value, np.float64)   # [1280, 1000]
  w = np.asarray(model.classifier.kernel.value, np.float64)[0, 0]
  for c, name in enumerate(constants.VOC_CLASSES):
    cols = list(constants.IMAGENET_CLASSES[name])
    want = (np.maximum(f @ fc[:, cols], 0).sum(-1) if cols else np.maximum(f @ w[:, c], 0))
    np.testing.assert_allclose(aux["cams"][..., c], want, rtol=1e-4, atol=1e-4, err_msg=name)
  np.testing.assert_allclose(logits, f.mean(axis=(1, 2)) @ w, rtol=1e-4, atol=1e-4)
  assert "backbone/fc" in model.backbone.frozen_prefixes
  assert "backbone/fc" not in build_backbone("lite0", rngs=nnx.Rngs(0)).frozen_prefixes
  for name in ("tiny", "resnet38"):
    with pytest.raises(UserError, match="imagenet_prior needs the lite0"):
      _abstract(lambda: CAMNet(name, rngs=nnx.Rngs(0), imagenet_prior=True))


def test_imagenet_counterparts_are_disjoint_and_named_as_imagenet_names_them():
  table = constants.IMAGENET_CLASSES
  assert tuple(table) == constants.VOC_CLASSES
  flat = [k for cols in table.values() for k in cols]
  assert len(flat) == len(set(flat)) and all(0 <= k < 1000 for k in flat)
  assert [name for name, cols in table.items() if not cols] == ["person"]
  # Spot checks against ImageNet's own label list (shipped inside tensorflow-datasets).
  from tensorflow_datasets.datasets.siscore import labels
  names = labels.IMAGENET_LABELS_LIST
  for voc, word in [("aeroplane", "airliner"), ("cow", "ox"), ("sheep", "ram"),
                    ("sofa", "studio couch"), ("cat", "Egyptian cat"), ("dog", "Chihuahua"),
                    ("tvmonitor", "television"), ("bird", "albatross"), ("bus", "school bus")]:
    assert any(names[k].startswith(word) for k in table[voc]), (voc, word)
  assert all("bottle" in names[k] or "jug" in names[k] for k in table["bottle"])


def test_affinity_head_initialisation_follows_reference():
  model = AffinityNet("tiny", rngs=nnx.Rngs(0), width=64)  # Real init: the statistics matter.
  for conv, fan_in in ((model.f8_3, 64), (model.f8_4, 128), (model.f8_5, 256)):
    k = np.asarray(conv.kernel.value)
    assert conv.bias is None
    assert abs(k.std() / math.sqrt(2 / fan_in) - 1) < 0.05
  k = np.asarray(model.f9.kernel.value)
  bound = 4 * math.sqrt(6 / (448 + 448))
  assert k.max() <= bound and k.max() > 0.95 * bound
  assert abs(k.std() / (bound / math.sqrt(3)) - 1) < 0.05
  res38 = _abstract(lambda: AffinityNet("resnet38", rngs=nnx.Rngs(0)))
  assert res38.f8_5.kernel.value.shape == (1, 1, 4096, 256)
  assert res38.backbone.b6.dropout_2b1.rate == 0.3 and res38.backbone.b7.dropout_2b2.rate == 0.5


def test_vgg_affinity_variant_uses_fc6_dilation_4():
  aff = _abstract(lambda: AffinityNet("vgg16", rngs=nnx.Rngs(0)))
  cam = _abstract(lambda: CAMNet("vgg16", rngs=nnx.Rngs(0)))
  assert aff.backbone.fc6.kernel_dilation in (4, (4, 4))
  assert cam.backbone.fc6.kernel_dilation in (1, (1, 1))


@pytest.mark.parametrize("head", HEADS)
def test_forward_backward_sharded_over_8_devices(head):
  devices = jax.devices()
  assert len(devices) == 8
  mesh = Mesh(np.array(devices), ("data",))
  data = NamedSharding(mesh, P("data"))
  model = head("tiny", rngs=nnx.Rngs(0), width=8)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jax.device_put(jax.random.normal(jax.random.key(1), (8, 24, 24, 3)), data)

  @jax.jit
  def step(params, rest, x, key):
    def loss_fn(p):
      m = nnx.merge(graphdef, p, rest)
      out, _ = m(x, train=True, key=key)
      return jnp.mean(out ** 2)
    return jax.value_and_grad(loss_fn)(params)

  loss, grads = step(params, rest, x, jax.random.key(2))
  assert np.isfinite(float(loss))
  norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > len(norms) // 2
  assert x.sharding.spec == P("data")


# Even kernels pad SAME unevenly; (4, 1, 3, (2, 3)) has outputs that no tap reaches.
@pytest.mark.parametrize("k,stride,dilation,size", [(3, 2, 1, (9, 12)), (5, 1, 2, (7, 8)),
                                                    (5, 2, 1, (8, 11)), (3, 1, 4, (6, 6)),
                                                    (2, 1, 1, (5, 6)), (4, 1, 3, (2, 3)),
                                                    (4, 2, 1, (7, 9))])
def test_depthwise_conv_matches_grouped_conv_with_same_padding(k, stride, dilation, size):
  dw = layers.DepthwiseConv(6, k, rngs=nnx.Rngs(0), stride=stride, dilation=dilation)
  x = jax.random.normal(jax.random.key(1), (2, *size, 6))
  want = jax.lax.conv_general_dilated(
      x, dw.kernel[...], (stride, stride), "SAME", rhs_dilation=(dilation, dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=6)
  np.testing.assert_allclose(dw(x), want, rtol=1e-5, atol=1e-5)
  # Under differentiation the custom rule computes the output by regions, unpadded.
  y, _ = jax.vjp(dw, x)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def _grouped_conv(x, kernel, stride, dilation):
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), "SAME", rhs_dilation=(dilation, dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


@pytest.mark.parametrize("k,stride,dilation,size", [(3, 2, 1, (9, 12)), (5, 1, 2, (7, 8)),
                                                    (5, 2, 1, (8, 11)), (3, 1, 4, (6, 6)),
                                                    (5, 1, 4, (10, 9)), (3, 1, 1, (5, 7)),
                                                    (2, 1, 1, (5, 6)), (4, 1, 3, (2, 3)),
                                                    (4, 2, 1, (7, 9))])
@pytest.mark.parametrize("max_rows", [32, 3])
def test_depthwise_conv_gradients_match_autodiff(k, stride, dilation, size, max_rows, monkeypatch):
  # The hand-written backward against autodiff of XLA's grouped convolution (the same
  # function), for the input and the kernel, under a loss that weights every output.
  # max_rows 3 splits the kernel gradient's rows into groups, the last ones shorter.
  monkeypatch.setattr(layers, "KERNEL_GRAD_MAX_ROWS", max_rows)
  x = jax.random.normal(jax.random.key(1), (3, *size, 5))
  kernel = jax.random.normal(jax.random.key(2), (k, k, 1, 5))
  weights = jax.random.normal(jax.random.key(3), _grouped_conv(x, kernel, stride, dilation).shape)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w, stride, dilation)) * weights)
  got = jax.jit(jax.grad(loss(layers.depthwise_conv), argnums=(0, 1)))(x, kernel)
  want = jax.grad(loss(_grouped_conv), argnums=(0, 1))(x, kernel)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_relu6_matches_jax_relu6_in_value_and_gradient():
  # Including the kinks at 0 and 6, where the gradient is 0 for both. Under
  # differentiation the forward is the custom rule's own formula: its values too.
  x = jnp.array([-3.0, -0.0, 0.0, 1e-30, 2.5, 6.0 - 1e-6, 6.0, 7.0, 1e9])
  np.testing.assert_array_equal(layers.relu6(x), jax.nn.relu6(x))
  np.testing.assert_array_equal(jax.jit(lambda x: jax.vjp(layers.relu6, x)[0])(x),
                                jax.nn.relu6(x))
  np.testing.assert_array_equal(jax.jit(jax.vmap(jax.grad(layers.relu6)))(x),
                                jax.vmap(jax.grad(jax.nn.relu6))(x))


def test_pointwise_conv_is_a_1x1_conv():
  pw = layers.PointwiseConv(6, 4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, 7, 6))
  want = jax.lax.conv_general_dilated(x, pw.kernel[...], (1, 1), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(pw(x), want, rtol=1e-5, atol=1e-5)
  assert pw.kernel.shape == (1, 1, 6, 4)


def test_lite0_gradients_match_xla_convolutions(monkeypatch):
  # The whole Lite0 CAM network: gradients of every parameter with the hand-written
  # depthwise backward and the 1x1 convs as products equal those of XLA's convolutions.
  model = CAMNet("lite0", rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(1), (2, 40, 48, 3))

  def grads():
    def loss_fn(p):
      logits, aux = nnx.merge(graphdef, p, rest)(x, train=False)
      return jnp.sum(jnp.sin(logits)) + jnp.mean(aux["cams"])
    return jax.jit(jax.grad(loss_fn))(params)

  got = grads()
  monkeypatch.setattr(layers, "depthwise_conv", _grouped_conv)
  monkeypatch.setattr(layers.PointwiseConv, "__call__", lambda self, x: jax.lax.conv_general_dilated(
      x, self.kernel[...], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  want = grads()
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-5 * float(jnp.max(jnp.abs(w))) + 1e-7)
