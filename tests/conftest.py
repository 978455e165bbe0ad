"""Shared pytest set-up.

Without a CUDA device the Triton kernels run on Triton's CPU interpreter, as Triton's own CI does. Triton reads
TRITON_INTERPRET when a kernel is decorated (``triton.jit``), i.e. when fastjac's kernel modules are imported, so it
is set here, before any test module imports fastjac. With a CUDA device the kernels are compiled for it instead.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu); none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
