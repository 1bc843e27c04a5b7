"""Shared fixtures; GPU tests are skipped without CUDA."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def random_generator(tmp_path_factory):
    """An untrained generator folder over the Fashion-MNIST vocabulary (no training needed)."""
    from tina.testing import random_bundle

    return random_bundle(tmp_path_factory.mktemp("gen") / "random")
