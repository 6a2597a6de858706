"""Dense CRF on the host (pydensecrf2) and a resumable worker pool that fills the CRF store.

Parameters are the reference's (docs/evaluation.md): unary -log(clip(p, 1e-5, 1)) of the
given channels (not renormalised), Gaussian pairwise sxy=3 compat=3, bilateral sxy=80
srgb=13 compat=10, 10 mean-field iterations, on the full-resolution RGB image.
Marginals are returned channels-last, [H, W, L] float32, like the store and the rest of
the package (NHWC).

This module imports only NumPy (and pydensecrf when a CRF runs) so the worker processes,
started with 'spawn' (forking a process that has initialised JAX is unsafe), stay light.
"""

import collections
import multiprocessing
from typing import Callable, Iterable

import numpy as np

from affinity_jax.errors import UserError
from affinity_jax.labels import store

INSTALL_HINT = "pydensecrf is not importable; install it with `pip install pydensecrf2`"


def _densecrf():
  try:
    import pydensecrf.densecrf as dcrf
  except ImportError as e:
    raise UserError(f"{INSTALL_HINT} ({e})") from None
  return dcrf


def dense_crf(image: np.ndarray, probs: np.ndarray, *, iterations: int = 10,
              gauss_sxy: float = 3, gauss_compat: float = 3, bi_sxy: float = 80,
              bi_srgb: float = 13, bi_compat: float = 10) -> np.ndarray:
  """Mean-field dense CRF.

  Args:
    image: uint8 [H, W, 3] RGB at the resolution of `probs`.
    probs: float [H, W, L] scores in [0, 1] (not required to sum to 1).
    iterations: mean-field steps.

  Returns:
    float32 [H, W, L] marginals (sum to 1 over L).
  """
  dcrf = _densecrf()
  h, w, n = probs.shape
  if image.shape != (h, w, 3):
    raise ValueError(f"image {image.shape} does not match probs {probs.shape}")
  unary = -np.log(np.clip(probs, 1e-5, 1.0)).astype(np.float32)
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


def run_pool(ids: Iterable[str], load: Callable[[str], tuple], out_dir: str, *,
             workers: int = 2, la_alpha: float = 4, ha_alpha: float = 32,
             progress: bool = True) -> int:
  """CRFs every id whose store file is missing, in `workers` processes; resumable.

  The calling process loads the inputs (it may hold JAX, datasets, ...) and ships arrays
  to 'spawn' workers that import only this module; each result is written atomically by
  `store.save`, so a killed run leaves whole files only and a rerun skips them. At most
  2 * workers images are in flight, so memory stays bounded.

  Args:
    ids: image ids.
    load: id -> (image uint8 [H, W, 3], cams float [H, W, k], keys int [k]).
    out_dir: store folder.
    workers: process count; <= 1 runs in this process.

  Returns:
    The number of images processed now (skipped ones not counted).
  """
  from tqdm import tqdm

  _densecrf()  # Fail early with the install hint, not inside a worker.
  todo = [i for i in ids if not store.exists(out_dir, i)]
  bar = tqdm(total=len(todo), desc="dense CRF", unit="img", disable=not progress)
  jobs = ((out_dir, i, *load(i), la_alpha, ha_alpha) for i in todo)
  try:
    if workers <= 1:
      for job in jobs:
        _work(job)
        bar.update(1)
      return len(todo)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      pending = collections.deque()
      for job in jobs:
        pending.append(pool.apply_async(_work, (job,)))
        while len(pending) >= 2 * workers or (pending and pending[0].ready()):
          pending.popleft().get()
          bar.update(1)
      while pending:
        pending.popleft().get()
        bar.update(1)
    return len(todo)
  finally:
    bar.close()
