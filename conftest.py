"""Pytest setup shared by every test: 8 fake CPU devices so sharding is real.

Must run before jax is imported anywhere, hence a root conftest.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
