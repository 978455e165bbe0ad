"""Shared pytest set-up for tests/ (TRITON_INTERPRET is set by the repository's top-level conftest.py).

Tests marked ``gpu`` are skipped, with the reason, when no CUDA device is present.
"""

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu); none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
