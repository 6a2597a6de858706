"""Two processes x 4 CPU devices on one machine run the pipeline as 1 x 8 does.

The processes talk over loopback (`affinity_jax.launch`, jax.distributed with gloo) and
share one workdir, as the hosts of a TPU pod slice share storage. The 1 x 8 references
are the session's runs (`tiny_workdir`, `voc_tiny_workdir`: 8 fake devices in this
process).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from affinity_jax import config_lib
from affinity_jax import workdir as workdir_layout
from affinity_jax import launch
from affinity_jax import sharding
from affinity_jax.stages import common

import voc_tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUDIT = os.path.join(REPO, "tests", "write_audit")
TINY = "configs/scenes.py:tiny"
TIMEOUT_S = 600  # A whole 2 x 4 run; they take 1-3 minutes on 2 contended cores.

pytestmark = pytest.mark.slow


def _env(audit: str | None = None) -> dict:
  path = [AUDIT] if audit else []
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      path + [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  if audit:
    env["AFFINITY_JAX_AUDIT"] = audit
  return env


def _launch(workdir: str, *args: str, audit: str | None = None,
            config: list[str] | None = None) -> str:
  """Runs `affinity_jax.main` as 2 x 4 on `workdir`; `config`: its --config arguments
  (default: the tiny scenes run's)."""
  cmd = [sys.executable, "-m", "affinity_jax.launch", "--num_processes=2",
         "--devices_per_process=4", "--grace_s=30", "--",
         *(config or [f"--config={TINY}"]), f"--workdir={workdir}", *args]
  proc = subprocess.run(cmd, cwd=REPO, env=_env(audit), capture_output=True, text=True,
                        timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  return proc.stdout


def _context(workdir: str) -> common.Context:
  """The context of the run that wrote `workdir`, with its config."""
  return common.Context(workdir_layout.saved_config(workdir)[1], workdir,
                        sharding.make_mesh())


def _params(ctx: common.Context, kind: str) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(ctx.trained_model(kind),
                                                           nnx.Param))]


def _curve(workdir: str, kind: str) -> list[tuple[int, float, float]]:
  with open(os.path.join(workdir, kind, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["step"], r["loss"], r["lr"]) for r in rows]


def _assert_trained_alike(a: str, b: str, kind: str) -> None:
  """Same loss curve and parameters (float tolerance) in workdirs a and b."""
  ca, cb = _curve(a, kind), _curve(b, kind)
  steps = _context(a).config[kind].train.steps
  assert [s for s, _, _ in ca] == [s for s, _, _ in cb] == list(range(1, steps + 1))
  # Equal at step 1; later steps inherit the parameters' float noise (below).
  np.testing.assert_allclose(ca[0][1], cb[0][1], rtol=1e-5)
  np.testing.assert_allclose([l for _, l, _ in ca], [l for _, l, _ in cb], rtol=5e-3)
  np.testing.assert_allclose([r for _, _, r in ca], [r for _, _, r in cb], rtol=1e-6)
  pa, pb = _params(_context(a), kind), _params(_context(b), kind)
  assert [p.shape for p in pa] == [p.shape for p in pb]
  # The gradient sums run in another order over 2 processes; Adam turns a sign flip of
  # a near-zero gradient entry into +-lr, so a few entries differ by up to 2 x 4 steps
  # x the new layers' 10 lr (1e-3). Measured: |a - b| / |a| = 1.1e-3 (cam), 2.4e-3 (aff)
  # over all parameters (scenes:tiny; voc_tiny trains only heads: 1e-9).
  for x, y in zip(pa, pb):
    np.testing.assert_allclose(x, y, atol=0.08)
  total = sum(float(np.sum((x - y) ** 2)) for x, y in zip(pa, pb))
  scale = sum(float(np.sum(x ** 2)) for x in pa)
  assert total <= 1e-4 * scale, (kind, total, scale)  # 1% in norm.


# ----------------------------------------------------------------------------- launcher


def test_launcher_command_and_environment():
  env = launch.process_environ(4, {"XLA_FLAGS": "--xla_foo=1 "
                                   "--xla_force_host_platform_device_count=8"})
  assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
  assert env["JAX_PLATFORMS"] == "cpu"
  cmd = launch.process_command(["--config=c.py", "--workdir=w"], "127.0.0.1:5", 2, 1)
  assert cmd[1:] == ["-m", "affinity_jax.main", "--config=c.py", "--workdir=w",
                     "--config.distributed.coordinator_address=127.0.0.1:5",
                     "--config.distributed.num_processes=2",
                     "--config.distributed.process_id=1"]
  port = launch.free_port()
  assert 0 < port < 65536
  with pytest.raises(SystemExit):
    launch.main(["--num_processes=2"])  # No main arguments after --.


def test_launcher_passes_on_a_failure(capsys):
  code = launch.launch([f"--config={TINY}x", "--workdir=unused"], 2, 1, grace_s=30)
  out = capsys.readouterr()
  assert code == 2
  for i in (0, 1):
    assert f"[p{i}] error: configs/scenes.py: unknown variant 'tinyx'" in out.out
  assert "launch: process" in out.err and "exited with status 2" in out.err


def test_launcher_reports_processes_that_failed_before_it_looked(monkeypatch, capsys):
  """Every process has already exited when the launcher first polls (the race CI hit)."""
  real_popen = subprocess.Popen

  def finished_popen(cmd, **kwargs):
    p = real_popen([sys.executable, "-c", "import sys; print('bad'); sys.exit(3)"], **kwargs)
    p.wait()
    return p

  monkeypatch.setattr(launch.subprocess, "Popen", finished_popen)
  assert launch.launch(["--workdir=unused"], 2, 1, grace_s=30) == 3
  out = capsys.readouterr()
  assert "[p0] bad" in out.out and "[p1] bad" in out.out
  assert "launch: process 0 exited with status 3\n" in out.err


@pytest.mark.parametrize("error, code, line", [
    ("RuntimeError('Gloo AllGather failed: Connection closed by peer')", 1,
     "error: process 0 failed: RuntimeError: Gloo AllGather failed: Connection closed by "
     "peer (another process of the run has stopped: see its output for why); run the "
     "same command again on every host to resume"),
    ("UserError('workdir w: bad')", 2, "error: workdir w: bad"),
])
def test_a_failed_process_exits_at_once_with_one_line(error, code, line):
  """What a host of a multi-host run prints when it fails (no traceback when another
  process stopped), then it exits without waiting for the others."""
  script = ("from affinity_jax import main\nfrom affinity_jax.errors import UserError\n"
            f"main.exit_at_once({error})\nprint('not reached')")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == code
  assert proc.stderr.strip().splitlines()[-1] == line and "Traceback" not in proc.stderr
  assert "not reached" not in proc.stdout


# ----------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def mh_run(tiny_workdir, tmp_path_factory):
  """The 1 x 8 run's classifier, everything after it rerun by 2 processes x 4 devices.

  Starting from the same classifier, the stages downstream see the same inputs as in
  the 1 x 8 run, so their outputs can be compared one by one. Returns (workdir, the
  writes log of `tests/write_audit`).
  """
  tmp = tmp_path_factory.mktemp("multihost")
  workdir, log = str(tmp / "run"), str(tmp / "writes.log")
  os.makedirs(workdir)
  for name in ("config.json", "tfds", "cam"):
    src = os.path.join(tiny_workdir, name)
    (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(workdir, name))
  out = _launch(workdir, audit=f"{workdir}:{log}")
  assert "[p0] [train_cam] done already, skipped" in out
  assert "[p1] [eval] finished" in out
  return workdir, log


def _assert_outputs_alike(a: str, b: str, trained: tuple[str, ...], images: int) -> None:
  """Workdirs a and b hold the same outputs of `infer_cam` and every later stage, and
  the same networks `trained` (float tolerance)."""
  one, two = _context(a), _context(b)
  ids = one.label_ids(only_mine=False)
  assert len(ids) == images
  for i in ids:
    (ca, ka), (cb, kb) = one.files.cams.load(i), two.files.cams.load(i)
    np.testing.assert_array_equal(ka, kb)
    np.testing.assert_allclose(ca, cb, atol=2e-3)  # Stored as float16.
    for x, y in zip(one.files.crf.load(i), two.files.crf.load(i)):
      np.testing.assert_allclose(x, y, atol=1.5 / 255)  # Stored as round(p * 255).
  for kind in trained:
    _assert_trained_alike(a, b, kind)
  for store in ("rw", "rw_crf") if one.config.rw.dcrf else ("rw",):
    same = np.mean([np.mean(getattr(one.files, store).load(i) ==
                            getattr(two.files, store).load(i)) for i in ids])
    assert same >= 0.99, (store, same)
  ra = json.load(open(one.files.reports.path("results.json")))
  rb = json.load(open(two.files.reports.path("results.json")))
  assert ra.keys() == rb.keys()
  flat_a, flat_b = config_lib.flatten(ra), config_lib.flatten(rb)
  assert flat_a.keys() == flat_b.keys()
  for key, value in flat_a.items():
    if isinstance(value, float):
      assert abs(value - flat_b[key]) <= 0.02 * max(1.0, abs(value)), key
    else:
      assert value == flat_b[key], key


def test_two_processes_give_the_outputs_of_one(mh_run, tiny_workdir):
  _assert_outputs_alike(tiny_workdir, mh_run[0], ("aff", "seg"), images=16)


def test_every_file_is_written_once_by_its_owner(mh_run):
  workdir, log = mh_run
  ctx = _context(workdir)
  owner = {i: f"p{k % 2}" for k, i in enumerate(ctx.label_ids(only_mine=False))}
  writes: dict[str, list[tuple[str, str]]] = {}
  with open(log) as f:
    for line in f:
      who, event, path = line.rstrip("\n").split(" ", 2)
      writes.setdefault(os.path.relpath(path, os.path.realpath(workdir)), []).append(
          (who, event))
  assert {w for events in writes.values() for w, _ in events} == {"p0", "p1"}
  checked = 0
  for folder, dirs, files in os.walk(workdir):
    for name in files:
      rel = os.path.relpath(os.path.join(folder, name), workdir)
      top = rel.split(os.sep)[0]
      if top in ("config.json", "tfds", "cam"):  # The 1 x 8 run's, copied.
        continue
      if "ckpt" in rel.split(os.sep):
        continue  # Below.
      events = [(w, e) for w, e in writes.get(rel, []) if e == "rename"] or writes.get(rel)
      assert events, f"{rel}: no writer logged"
      assert len(events) == 1, (rel, events)
      who, event = events[0]
      image_id, ext = os.path.splitext(name)
      if name.startswith("DONE-"):
        assert who == f"p{name[len('DONE-'):]}", rel
      elif image_id in owner:
        assert (who, event) == (owner[image_id], "rename"), rel  # Atomic, by its owner.
      else:  # metrics.jsonl, eval/*: process 0.
        assert who == "p0", rel
      checked += 1
  # Checkpoints go through orbax's multi-host path: what Python writes of them comes
  # from the primary host (the arrays go through tensorstore, unseen here), except
  # each host's own array_metadatas/process_<i>.
  ckpt = [(who, rel) for rel, events in writes.items() if "ckpt" in rel.split(os.sep)
          for who, _ in events]
  assert len(ckpt) > 4 and {w for w, _ in ckpt} == {"p0", "p1"}
  for who, rel in ckpt:
    name = os.path.basename(rel)
    assert who == (f"p{name[len('process_'):]}" if name.startswith("process_") else "p0"), rel
  assert checked >= 4 * 16 + 4  # cam_maps, crf, rw, rw_crf + markers, logs, reports.


# ----------------------------------------------------------------------------- SIGTERM

STOP_AT = os.path.join(REPO, "tests", "stop_at")


def _launch_stopped(workdir: str, at: str) -> str:
  """Runs the tiny pipeline as 2 x 4 on `workdir` with SIGTERM at `at`
  (`tests/stop_at`); both processes must stop with status 143."""
  env = dict(_env(), AFFINITY_JAX_STOP_AT=at,
             PYTHONPATH=os.pathsep.join([STOP_AT, _env()["PYTHONPATH"]]))
  proc = subprocess.run(
      [sys.executable, "-m", "affinity_jax.launch", "--num_processes=2",
       "--devices_per_process=4", "--grace_s=30", "--", f"--config={TINY}",
       f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=TIMEOUT_S)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 143, out[-4000:]
  stops = [line for line in proc.stdout.splitlines() if "stopped by SIGTERM" in line]
  assert sorted(line[:5] for line in stops) == ["[p0] ", "[p1] "], out[-4000:]
  assert "Traceback" not in out and "launch: stopping process" not in out, out[-4000:]
  return out


def test_sigterm_on_two_processes_keeps_the_work_and_the_rerun_matches(mh_run,
                                                                      tiny_workdir,
                                                                      tmp_path):
  """As `mh_run` (the 1 x 8 classifier, the rest by 2 x 4), stopped by SIGTERM in
  infer_cam (both processes) and in train_aff (process 0 only), then rerun."""
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  for name in ("config.json", "tfds", "cam"):
    src = os.path.join(tiny_workdir, name)
    (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(workdir, name))

  # Each process signals itself at its third image, or stops earlier when it learns of
  # the other's signal: what each says it stored is there, and no DONE marker.
  out = _launch_stopped(workdir, "infer_cam:3")
  counts = [int(c) for c in re.findall(r"stopped by SIGTERM in infer_cam, (\d) of 8", out)]
  assert len(counts) == 2 and 3 in counts, out[-4000:]
  stored = sorted(os.listdir(os.path.join(workdir, "cam_maps")))
  assert len(stored) == sum(counts) and all(n.endswith(".npz") for n in stored)

  # Process 0 alone gets it, during step 2; the processes' OR of their signals is read
  # one step boundary later, so both stop after step 3 (periodic checkpoints: 2, 4).
  out = _launch_stopped(workdir, "train:aff:1")
  line = ("stopped by SIGTERM at step 3 of 4, after saving checkpoint "
          f"{os.path.join(workdir, 'aff', 'ckpt', '3')}")
  assert out.count(line) == 2, out[-4000:]
  ckpts = sorted(int(n) for n in os.listdir(os.path.join(workdir, "aff", "ckpt"))
                 if n.isdigit())
  assert ckpts == [2, 3]
  assert [s for s, _, _ in _curve(workdir, "aff")] == [1, 2, 3]
  _launch(workdir)
  ours = json.load(open(os.path.join(workdir, "eval", "results.json")))
  theirs = json.load(open(os.path.join(mh_run[0], "eval", "results.json")))
  assert ours == theirs


# ----------------------------------------------------------------------------- failures


def test_a_lone_death_fails_the_other_and_both_resume(tiny_workdir, tmp_path):
  """Process 1 is killed mid-training: process 0 stops with a clear one-line error
  within seconds; relaunched, the two finish the stage as 1 x 8 trains it."""
  workdir = str(tmp_path / "run")
  address = f"127.0.0.1:{launch.free_port()}"
  env = launch.process_environ(4, _env())
  args = [f"--config={TINY}", f"--workdir={workdir}", "--mode=train_cam",
          "--config.distributed.heartbeat_timeout_s=10",
          # A checkpoint per step (a free key): the kill after the first leaves steps to
          # resume even on a fast machine.
          "--config.cam.train.ckpt_every=1"]
  procs = [subprocess.Popen(launch.process_command(args, address, 2, i), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    deadline = time.monotonic() + TIMEOUT_S
    ckpt = os.path.join(workdir, "cam", "ckpt", "1")
    while not os.path.isdir(ckpt):
      assert time.monotonic() < deadline and procs[0].poll() is None, "no checkpoint 1"
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    out, _ = procs[0].communicate(timeout=120)
    waited = time.monotonic() - killed
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  if procs[0].returncode == 0:
    pytest.fail("process 0 finished before process 1 was killed; nothing was tested:\n"
                + out[-2000:])
  print(f"process 0 stopped {waited:.1f} s after process 1 was killed")
  assert waited < 60, waited
  last = [line for line in out.splitlines() if line.startswith("error:")]
  assert last and "another process of the run has stopped" in last[-1], out[-3000:]
  # Relaunched, both resume from the last checkpoint and end as the 1 x 8 run.
  step = _context(workdir).files.checkpoints("cam").latest_step()
  assert step in (1, 2, 3), f"checkpoint {step}: nothing left to resume"
  out = _launch(workdir, "--mode=train_cam")
  assert "[p0] [train_cam] running" in out
  _assert_trained_alike(tiny_workdir, workdir, "cam")


def _written(folder: str) -> dict[str, tuple[int, int]]:
  """The finished .npz files in `folder`, each with (inode, mtime): a rewrite changes both.

  A writer's temporary file (`.tmp-*`, see `affinity_jax.io`) is not a written file, and
  it can be renamed away between the listing and the stat while the processes run.
  """
  names = os.listdir(folder) if os.path.isdir(folder) else []
  written = {}
  for n in names:
    if n.endswith(".npz") and not n.startswith("."):
      try:
        st = os.stat(os.path.join(folder, n))
      except FileNotFoundError:
        continue
      written[n] = (st.st_ino, st.st_mtime_ns)
  return written


@pytest.fixture(scope="module")
def voc_mh_run(voc_tiny_workdir, tmp_path_factory):
  """`voc_tiny`'s whole pipeline from scratch by 2 processes x 4 devices, both killed
  in `infer_cam` once each has written a CAM, then relaunched to the end (~1.5 min).

  One run serves both tests below: the relaunch must resume and still end as the
  1 x 8 run. Its backbones stay frozen, so the two classifiers agree to float noise
  and every stage can be compared with the 1 x 8 run's, `train_cam` included.
  Returns (workdir, each process's CAM file names, the CAM files at the kill as
  `_written` gives them, the relaunch's output).
  """
  ids = _context(voc_tiny_workdir).label_ids(only_mine=False)
  shares = [{f"{i}.npz" for i in ids[k::2]} for k in range(2)]  # Process k's images.
  tmp = tmp_path_factory.mktemp("multihost_voc")
  workdir, cams = str(tmp / "run"), str(tmp / "run" / "cam_maps")
  args = [*voc_tiny.args(), f"--workdir={workdir}"]
  address = f"127.0.0.1:{launch.free_port()}"
  env = launch.process_environ(4, _env())
  logs = [tmp / f"p{i}.log" for i in range(2)]  # Files: an unread pipe could fill up.
  procs = []
  for i, log in enumerate(logs):
    with open(log, "w") as f:
      procs.append(subprocess.Popen(launch.process_command(args, address, 2, i), cwd=REPO,
                                    env=env, stdout=f, stderr=subprocess.STDOUT))
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while (not all(share & _written(cams).keys() for share in shares)
           and time.monotonic() < deadline):
      if any(p.poll() is not None for p in procs):
        break
      time.sleep(0.01)
  finally:
    for p in procs:
      p.kill()
      p.wait()
  outs = [log.read_text() for log in logs]
  kept = _written(cams)
  assert all(share & kept.keys() for share in shares), (
      f"CAMs written before the kill: {sorted(kept)}\n" + "\n".join(o[-2000:] for o in outs))
  assert all("[infer_cam] running" in o for o in outs), outs[0][-2000:]
  out = _launch(workdir, config=voc_tiny.args())
  return workdir, shares, kept, out


def test_voc_sample_two_processes_give_the_outputs_of_one(voc_mh_run, voc_tiny_workdir):
  _assert_outputs_alike(voc_tiny_workdir, voc_mh_run[0], ("cam", "aff"), images=24)


def test_both_killed_mid_inference_resume(voc_mh_run):
  """The relaunch keeps the CAMs written before the kill and writes the rest (their
  values: the test above)."""
  workdir, shares, kept, out = voc_mh_run
  ids = _context(workdir).label_ids(only_mine=False)
  print(f"{len(kept)} of {len(ids)} CAMs written before the kill")
  for k, share in enumerate(shares):
    if not share - kept.keys():
      pytest.fail(f"process {k} wrote all its CAMs before the kill: it resumed nothing")
  for i in (0, 1):
    assert f"[p{i}] [train_cam] done already, skipped" in out
    assert f"[p{i}] [infer_cam] running" in out and f"[p{i}] [eval] finished" in out
  now = _written(os.path.join(workdir, "cam_maps"))
  assert {n: now[n] for n in kept} == kept
  assert len(now) == len(ids)
  assert {"DONE-0", "DONE-1"} <= set(os.listdir(os.path.join(workdir, "cam_maps")))
