"""Config loading, overrides and their errors, the workdir claim, the command line."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from affinity_jax import config_lib
from affinity_jax import defaults
from affinity_jax import main
from affinity_jax import workdir as workdir_layout
from affinity_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = textwrap.dedent('''
    import ml_collections

    def get_config(arg=None):
      c = ml_collections.ConfigDict()
      c.model = "resnet38"
      c.train = ml_collections.ConfigDict(dict(lr=0.01, steps=100, log_every=10,
                                               momentum=0.9, progress=True))
      c.scales = (1.0, 0.5)
      c.crf = ml_collections.ConfigDict(dict(alpha_low=4, alpha_high=32))
      c.distributed = ml_collections.ConfigDict(dict(coordinator_address=""))
      if arg == "tiny":
        c.train.steps = 2
      return c
''')


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / "exp.py"
  path.write_text(CONFIG)
  return str(path)


def test_load_variant_and_overrides(config_file):
  config = config_lib.load_config(config_file + ":tiny", {
      "train.lr": "0.1", "train.steps": "7", "train.progress": "false",
      "scales": "(1.0, 2.0, 0.5)", "model": "vgg16", "train.momentum": "1"})
  assert config.train.lr == 0.1 and config.train.steps == 7 and config.train.progress is False
  assert config.scales == (1.0, 2.0, 0.5) and config.model == "vgg16"
  assert config.train.momentum == 1.0 and isinstance(config.train.momentum, float)
  assert config_lib.load_config(config_file + ":tiny").train.steps == 2
  with pytest.raises(AttributeError):  # Locked: no new keys by accident.
    config.train.lrr = 3


def test_unknown_keys_and_bad_values(config_file):
  with pytest.raises(UserError, match=r"unknown config key train\.lrr; did you mean train\.lr"):
    config_lib.load_config(config_file, {"train.lrr": "0.1"})
  with pytest.raises(UserError, match=r"unknown config key tran\.lr"):
    config_lib.load_config(config_file, {"tran.lr": "0.1"})
  with pytest.raises(UserError, match=r"config key train\.steps: '1\.5' is not a valid int"):
    config_lib.load_config(config_file, {"train.steps": "1.5"})
  with pytest.raises(UserError, match=r"train\.progress"):
    config_lib.load_config(config_file, {"train.progress": "maybe"})
  with pytest.raises(UserError, match=r"config key train is a group"):
    config_lib.load_config(config_file, {"train": "1"})
  with pytest.raises(UserError, match="does not exist"):
    config_lib.load_config("configs/nope.py")



def test_variants_and_their_errors(tmp_path):
  path = tmp_path / "exp.py"
  path.write_text(textwrap.dedent('''
      import ml_collections
      from affinity_jax import config_lib

      def get_config(arg=None):
        c = ml_collections.ConfigDict(dict(steps=100, crop=448))
        return config_lib.apply_variant(c, arg, VARIANTS)

      def tiny(c):
        c.steps = 2

      VARIANTS = {"tiny": tiny, "small": lambda c: c.update(crop=64)}
  '''))
  assert config_lib.load_config(f"{path}:tiny").steps == 2
  assert config_lib.load_config(f"{path}:small").crop == 64
  assert config_lib.load_config(str(path)).steps == 100
  with pytest.raises(UserError, match=rf"^{path}: unknown variant 'tinny'; did you mean "
                     r":tiny\? \(variants: :tiny, :small or none\)$"):
    config_lib.load_config(f"{path}:tinny")
  with pytest.raises(UserError, match=r"unknown variant 'large' \(variants"):
    config_lib.load_config(f"{path}:large")
  with pytest.raises(UserError, match=r"unknown variant 'x'"):
    config_lib.load_config("configs/voc12_lite0.py:x")


@pytest.mark.parametrize("body,where,what", [
    ("import os\n\ndef get_config(arg=None)\n  return 1\n", 3, "SyntaxError: expected ':'"),
    ("import ml_collections\n\ndef get_config(arg=None):\n  c = ml_collections.ConfigDict()\n"
     "  c.lock()\n  c.crop = 8\n  return c\n", 6, "AttributeError: "),
    ("X = 1 / 0\n", 1, "ZeroDivisionError: division by zero"),
    ("def get_config():\n  raise KeyError('steps')\n", 2, "KeyError: 'steps'"),
])
def test_errors_in_a_config_file_name_the_file_and_line(tmp_path, body, where, what):
  path = tmp_path / "broken.py"
  path.write_text(body)
  with pytest.raises(UserError) as e:
    config_lib.load_config(str(path))
  message = str(e.value)
  assert message.startswith(f"{path}:{where}: {what}") and "\n" not in message, message


def test_command_line(config_file, tmp_path):
  cl = main.parse_command_line(
      [f"--config={config_file}:tiny", "--workdir", str(tmp_path / "w"),
       "--config.crf.alpha_low=8", "--mode=train_cam"], modes=("all", "train_cam"))
  assert cl.config.crf.alpha_low == 8 and cl.mode == "train_cam"
  assert cl.config_name == config_file + ":tiny" and cl.workdir == str(tmp_path / "w")
  with pytest.raises(UserError, match="missing --workdir"):
    main.parse_command_line([f"--config={config_file}"])
  with pytest.raises(UserError, match="unknown flag --wrkdir"):
    main.parse_command_line([f"--config={config_file}", "--wrkdir=x"])
  with pytest.raises(UserError, match="unknown --mode=bogus"):
    main.parse_command_line([f"--config={config_file}", "--workdir=x", "--mode=bogus"],
                                  modes=("all",))


def test_workdir_guard(config_file, tmp_path):
  workdir = str(tmp_path / "w")
  workdir_layout.claim(config_lib.load_config(config_file), workdir, "exp")
  saved = json.loads((tmp_path / "w" / "config.json").read_text())
  assert saved["config_name"] == "exp" and saved["config"]["train"]["lr"] == 0.01
  # Free keys may differ: longer training, logging, distributed set-up.
  longer = config_lib.load_config(config_file, {"train.steps": "300", "train.log_every": "1",
                                                "distributed.coordinator_address": "auto"})
  workdir_layout.claim(longer, workdir, "exp")
  assert json.loads((tmp_path / "w" / "config.json").read_text())["config"]["train"]["steps"] == 300
  other = config_lib.load_config(config_file, {"train.lr": "0.1"})
  with pytest.raises(UserError, match=rf"workdir {workdir} was written by config exp "
                     r"\(train\.lr: 0\.01 there, 0\.1 now\); use another --workdir"):
    workdir_layout.claim(other, workdir, "exp2")
  # The other hosts of a multi-host run check the same way but never write.
  with pytest.raises(UserError, match="train.lr"):
    workdir_layout.claim(other, workdir, "exp2", write=False)
  fresh = str(tmp_path / "fresh")
  workdir_layout.claim(other, fresh, "exp2", write=False)
  assert not os.path.exists(os.path.join(fresh, "config.json"))


def test_workdir_config_reads_back_what_the_guard_wrote(config_file, tmp_path):
  workdir = str(tmp_path / "w")
  config = config_lib.load_config(config_file)
  workdir_layout.claim(config, workdir, "exp")
  name, saved = workdir_layout.saved_config(workdir)
  assert name == "exp" and saved.to_dict() == config.to_dict()
  (tmp_path / "w" / "config.json").write_text('{"config": 3}')
  with pytest.raises(UserError, match=r"config\.json: not a config written by affinity_jax"):
    workdir_layout.saved_config(workdir)
  with pytest.raises(UserError, match=r"config\.json: not a config written"):
    workdir_layout.saved_config(str(tmp_path / "missing"))


def test_worker_counts_within_a_workdir(tmp_path):
  """Worker counts may change: CRF labels do not depend on them, and a training stage
  resumes its stream with the grain worker count saved in its checkpoint."""
  workdir = str(tmp_path / "w")
  tiny = "configs/scenes.py:tiny"
  workdir_layout.claim(config_lib.load_config(tiny), workdir, tiny)
  for key in ("crf.num_workers", "data.num_workers"):
    workdir_layout.claim(config_lib.load_config(tiny, {key: "3"}), workdir, tiny)
    _, saved = workdir_layout.saved_config(workdir)
    assert config_lib.flatten(saved)[key] == 3
  with pytest.raises(UserError, match=r"\(data\.infer_pad: 64 there, 32 now\); use another"):
    workdir_layout.claim(config_lib.load_config(tiny, {"data.infer_pad": "32"}), workdir,
                             tiny)


def test_segmentation_keys_change_until_the_net_has_started(tmp_path):
  """A workdir of a config without the segmentation net can go on with it (`:cpu`
  then `:cpu_full`); once the net has trained or been scored its keys are fixed."""
  workdir = str(tmp_path / "w")
  tiny = "configs/scenes.py:tiny"
  workdir_layout.claim(config_lib.load_config(tiny, {"seg.enabled": "False"}), workdir, tiny)
  with_seg = config_lib.load_config(tiny, {"seg.enabled": "True", "seg.head_width": "64",
                                           "data.seg_eval_split": "train"})
  workdir_layout.claim(with_seg, workdir, tiny)
  _, saved = workdir_layout.saved_config(workdir)
  assert saved.seg.enabled and saved.seg.head_width == 64
  # Other keys stay fixed meanwhile.
  with pytest.raises(UserError, match=r"\(rw\.beta: "):
    workdir_layout.claim(config_lib.load_config(tiny, {"rw.beta": "3.0"}), workdir, tiny)
  narrower = config_lib.load_config(tiny, {"seg.enabled": "True", "seg.head_width": "32",
                                           "data.seg_eval_split": "train"})
  reports = tmp_path / "w" / "eval"
  reports.mkdir()
  (reports / "results.json").write_text(json.dumps({"methods": {"CAM": {}, "CAM+RW": {}}}))
  workdir_layout.claim(narrower, workdir, tiny)  # Scored, but not the net: still free.
  workdir_layout.claim(with_seg, workdir, tiny)
  (reports / "results.json").write_text(json.dumps({"methods": {"CAM": {}, "seg (train)": {}}}))
  with pytest.raises(UserError, match=r"\(seg\.head_width: 64 there, 32 now\)"):
    workdir_layout.claim(narrower, workdir, tiny)
  (reports / "results.json").unlink()
  (tmp_path / "w" / "seg").mkdir()
  with pytest.raises(UserError, match=r"\(seg\.head_width: 64 there, 32 now\)"):
    workdir_layout.claim(narrower, workdir, tiny)


def test_within_workdir_rules_name_real_keys():
  keys = config_lib.flatten(defaults.base_config())
  leaves = {key.rsplit(".", 1)[-1] for key in keys}
  assert config_lib.FREE_LEAVES <= leaves
  assert config_lib.FREE_KEYS <= set(keys)
  assert all(any(k.startswith(group + ".") for k in keys) for group in config_lib.FREE_GROUPS)
  assert all(g in keys or any(k.startswith(g + ".") for k in keys) for g in config_lib.SEG_KEYS)
  # An added key's old behaviour is its default (the defaults do what ran before it),
  # except where the default changed on purpose: VOC inference pads onto two canvases,
  # so an older VOC workdir (tight padding) refuses the new default instead of mixing.
  changed = {"data.infer_canvases"}
  assert ({k: keys[k] for k in config_lib.ADDED_KEYS if k not in changed}
          == {k: v for k, v in config_lib.ADDED_KEYS.items() if k not in changed})
  assert keys["data.infer_canvases"] != config_lib.ADDED_KEYS["data.infer_canvases"]


def test_a_workdir_from_before_a_key_was_added_reads_as_its_old_behaviour(tmp_path):
  workdir = str(tmp_path / "w")
  tiny = "configs/scenes.py:tiny"
  workdir_layout.claim(config_lib.load_config(tiny), workdir, tiny)
  path = tmp_path / "w" / "config.json"
  record = json.loads(path.read_text())
  del record["config"]["rw"]["normalize"]
  path.write_text(json.dumps(record))
  _, saved = workdir_layout.saved_config(workdir)
  assert saved.rw.normalize == "none"
  with pytest.raises(UserError, match=r"\(rw\.normalize: 'none' there, 'class' now\)"):
    workdir_layout.claim(config_lib.load_config(tiny, {"rw.normalize": "class"}),
                             workdir, tiny)
  workdir_layout.claim(config_lib.load_config(tiny), workdir, tiny)
  assert json.loads(path.read_text())["config"]["rw"]["normalize"] == "none"


def test_run_main(capsys):
  def failing(argv):
    raise UserError(f"bad {argv[0]}")
  with pytest.raises(SystemExit) as e:
    main.run_main(failing, ["thing"])
  assert e.value.code == 2
  assert capsys.readouterr().err == "error: bad thing\n"


def test_every_config_variant_loads_without_jax():
  """Loading a config (and so checking a workdir) imports no jax, flax or orbax."""
  script = textwrap.dedent("""
      import glob, runpy, sys
      from affinity_jax import config_lib
      for path in sorted(glob.glob("configs/*.py")):
        for variant in [""] + list(runpy.run_path(path).get("VARIANTS", {})):
          config_lib.load_config(f"{path}:{variant}" if variant else path)
      heavy = sorted({m.split(".")[0] for m in sys.modules} & {"jax", "flax", "orbax"})
      assert not heavy, heavy
  """)
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, check=True)
