"""affinity_jax: AffinityNet (Ahn & Kwak, CVPR 2018) in JAX and Flax NNX."""

__version__ = "0.1.0"
