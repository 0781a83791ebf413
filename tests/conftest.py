"""Shared pytest hooks: tests marked `gpu` run only where JAX's default backend is a GPU."""

import jax
import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if jax.default_backend() == "gpu":
        return
    skip_gpu = pytest.mark.skip(reason=f"needs a CUDA GPU; {jax.default_backend()=}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
