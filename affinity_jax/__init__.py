"""affinity_jax: AffinityNet (Ahn & Kwak, CVPR 2018) in JAX and Flax NNX."""

__version__ = "0.1.0"


def __getattr__(name):
  # `affinity_jax.refine` without importing jax for every `python -m affinity_jax...`.
  if name == "refine":
    from affinity_jax.inference.walk import refine
    return refine
  raise AttributeError(f"module 'affinity_jax' has no attribute {name!r}")
