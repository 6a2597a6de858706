"""Dense CRF on the host (pydensecrf2) and the worker pools that run it.

Parameters are the reference's (docs/evaluation.md): unary -log(clip(p, 1e-5, 1)) of the
given channels (not renormalised), Gaussian pairwise sxy=3 compat=3, bilateral sxy=80
srgb=13 compat=10, 10 mean-field iterations, on the full-resolution RGB image.
Marginals are returned channels-last, [H, W, L] float32, like the store and the rest of
the package (NHWC).

This module imports only NumPy (and pydensecrf when a CRF runs; `progress` needs only
the standard library) so the worker processes, started with 'spawn' (forking a process
that has initialised JAX is unsafe), stay light.
"""

import collections
import itertools
import multiprocessing
from typing import Any, Callable, Iterable

import numpy as np

from affinity_jax import io
from affinity_jax import stopping
from affinity_jax.errors import UserError
from affinity_jax.labels import store
from affinity_jax.progress import Progress

INSTALL_HINT = "pydensecrf is not importable; install it with `pip install pydensecrf2`"


def _densecrf():
  try:
    import pydensecrf.densecrf as dcrf
  except ImportError as e:
    raise UserError(f"{INSTALL_HINT} ({e})") from None
  return dcrf


def dense_crf(image: np.ndarray, probs: np.ndarray, *, iterations: int = 10,
              gauss_sxy: float = 3, gauss_compat: float = 3, bi_sxy: float = 80,
              bi_srgb: float = 13, bi_compat: float = 10, unary_weight: float = 1.0
              ) -> np.ndarray:
  """Mean-field dense CRF.

  Args:
    image: uint8 [H, W, 3] RGB at the resolution of `probs`.
    probs: float [H, W, L] scores in [0, 1] (not required to sum to 1).
    iterations: mean-field steps.
    unary_weight: multiplies the unary -log(probs): how much the scores are trusted
      against the pairwise terms.

  Returns:
    float32 [H, W, L] marginals (sum to 1 over L).
  """
  dcrf = _densecrf()
  h, w, n = probs.shape
  if image.shape != (h, w, 3):
    raise ValueError(f"image {image.shape} does not match probs {probs.shape}")
  unary = (-unary_weight * np.log(np.clip(probs, 1e-5, 1.0))).astype(np.float32)
  unary = np.ascontiguousarray(unary.reshape(h * w, n).T)
  d = dcrf.DenseCRF2D(w, h, n)
  d.setUnaryEnergy(unary)
  d.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
  d.addPairwiseBilateral(sxy=bi_sxy, srgb=bi_srgb,
                         rgbim=np.require(image, np.uint8, ["C", "W"]), compat=bi_compat)
  q = np.asarray(d.inference(iterations), np.float32)
  return q.reshape(n, h, w).transpose(1, 2, 0).copy()


def crf_low_high(image: np.ndarray, cams: np.ndarray, keys, *, la_alpha: float = 4,
                 ha_alpha: float = 32, iterations: int = 10
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The two CRF runs of the affinity-label stage.

  Args:
    image: uint8 [H, W, 3].
    cams: float [H, W, k] merged, max-normalised CAMs of the present classes.
    keys: int [k] label ids (1..20) of the CAM channels, any order.
    la_alpha, ha_alpha: background exponents, bg = (1 - max_c M_c) ** alpha.

  Returns:
    (la [H, W, k+1], ha [H, W, k+1], keys [k+1] int32): channel 0 is background, then
    the present classes in ascending label order.
  """
  keys = np.asarray(keys, np.int32).reshape(-1)
  cams = np.asarray(cams, np.float32)
  if cams.shape[-1] != keys.shape[0]:
    raise ValueError(f"cams {cams.shape} vs keys {keys.tolist()}")
  order = np.argsort(keys, kind="stable")
  keys, cams = keys[order], cams[..., order]
  # ops.cam.background_score in NumPy: this runs in CRF workers, which never import JAX.
  base = 1.0 - (cams.max(axis=-1) if keys.size else np.zeros(cams.shape[:2], np.float32))
  base = np.clip(base, 0.0, 1.0)
  out = []
  for alpha in (la_alpha, ha_alpha):
    probs = np.concatenate([(base ** alpha)[..., None], cams], axis=-1)
    out.append(dense_crf(image, probs, iterations=iterations))
  return out[0], out[1], np.concatenate([[0], keys]).astype(np.int32)


def _work(job):
  """Worker body: CRF one image and store it. Module-level so 'spawn' can pickle it."""
  out_dir, image_id, image, cams, keys, la_alpha, ha_alpha = job
  la, ha, k = crf_low_high(image, cams, keys, la_alpha=la_alpha, ha_alpha=ha_alpha)
  store.save(out_dir, image_id, la, ha, k)
  return image_id


def label_png(job, unary_weight: float = 1.0) -> str:
  """Worker body of the walk's dense CRF (CAM+RW+dCRF): refine scores, write the labels.

  Args:
    job: (path, image uint8 [H, W, 3], scores float [H, W, L] the walk's output at the
      image size, keys int [L] the label id of each channel).
    unary_weight: `dense_crf`'s, `config.rw.dcrf_unary_weight`.

  Returns:
    The path written (a VOC-paletted PNG of keys[argmax of the CRF marginals]).
  """
  path, image, scores, keys = job
  io.save_label_png(path, refine_scores(image, scores, keys, unary_weight))
  return path


def refine_scores(image: np.ndarray, scores: np.ndarray, keys, unary_weight: float = 1.0
                  ) -> np.ndarray:
  """The walk's scores [H, W, L] (channel l of label id keys[l]) refined by the dense
  CRF: uint8 [H, W] label ids."""
  probs = np.maximum(scores, 0) / np.maximum(scores.sum(-1, keepdims=True), 1e-5)
  q = dense_crf(image, probs, unary_weight=unary_weight)
  return np.asarray(keys, np.uint8)[np.argmax(q, -1)]


def map_jobs(work: Callable, jobs: Iterable, workers: int,
             done: Callable[[Any], None] = lambda _: None) -> int:
  """Runs `work(job)` for every job, in `workers` 'spawn' processes; bounded and lazy.

  `jobs` is consumed as results come back, at most 2 * workers in flight, so a producer
  (a loader, the random walk) runs alongside the workers and memory stays bounded.
  `done(result)` is called in the order of `jobs` (e.g. a `progress.Progress`'s update).
  A worker's exception is raised here.

  Args:
    work: a module-level function of this module (workers import only this module).
    jobs: picklable arguments of `work`.
    workers: process count; <= 1 runs in this process.
    done: called with each result.

  Returns:
    The number of jobs run.
  """
  count = 0
  if workers <= 1:
    for job in jobs:
      done(work(job))
      count += 1
    return count
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    pending = collections.deque()
    for job in jobs:
      pending.append(pool.apply_async(work, (job,)))
      while len(pending) >= 2 * workers or (pending and pending[0].ready()):
        done(pending.popleft().get())
        count += 1
    while pending:
      done(pending.popleft().get())
      count += 1
  return count


def run_pool(ids: Iterable[str], load: Callable[[str], tuple], out_dir: str, *,
             workers: int = 2, la_alpha: float = 4, ha_alpha: float = 32,
             progress: bool = True, done: Callable[[str], None] = lambda _: None) -> int:
  """CRFs every id whose store file is missing, in `workers` processes; resumable.

  The calling process loads the inputs (it may hold JAX, datasets, ...) and ships arrays
  to 'spawn' workers that import only this module; each result is written atomically by
  `store.save`, so a killed run leaves whole files only and a rerun skips them. At most
  2 * workers images are in flight, so memory stays bounded (`map_jobs`).

  Args:
    ids: image ids.
    load: id -> (image uint8 [H, W, 3], cams float [H, W, k], keys int [k]).
    out_dir: store folder.
    workers: process count; <= 1 runs in this process.
    progress: show a `progress.Progress` display (a bar or timed lines).
    done: called with each image id once its file is stored, in the order of `ids`.

  Returns:
    The number of images processed now (skipped ones not counted).
  """
  _densecrf()  # Fail early with the install hint, not inside a worker.
  todo = [i for i in ids if not store.exists(out_dir, i)]
  # A stop request (`affinity_jax.stopping`) ends the jobs; those in flight finish.
  jobs = ((out_dir, i, *load(i), la_alpha, ha_alpha)
          for i in itertools.takewhile(lambda _: not stopping.requested(), todo))
  with Progress(total=len(todo), desc="dense CRF", unit="img", disable=not progress) as bar:
    return map_jobs(_work, jobs, workers, lambda image_id: (bar.update(1), done(image_id)))
