"""Pretrained weights: torch-free readers (`pytorch`, `mxnet`, `keras`), name tables
(`mappings`) and `load.load_pretrained`."""

from affinity_jax.weights.load import LoadReport, load_pretrained

__all__ = ["LoadReport", "load_pretrained"]
