"""Build shim: the trainer's metadata is in pyproject.toml; the C++ build step lives with the kernels
(kernels/setup.py ships csrc/ inside opcod-kernels)."""
from setuptools import setup

setup()
