"""Shared pytest hooks: tests marked `gpu` run only where JAX's default backend is a GPU.

The suite runs in several worker processes (pytest-xdist, `addopts` in pyproject.toml); on a
GPU each would otherwise reserve 75% of the device's memory when JAX starts.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# After the allocator setting, which JAX reads when it starts.
import jax
import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if jax.default_backend() == "gpu":
        return
    skip_gpu = pytest.mark.skip(reason=f"needs a CUDA GPU; {jax.default_backend()=}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
