"""Test setup: without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter.

``TRITON_INTERPRET`` must be set before ``triton`` is imported (``triton.jit`` reads it), hence here, at the top.

Tests marked ``gpu`` (``tests/test_gpu.py``, run with ``pytest -m gpu``) need a CUDA device and are skipped without
one, unless ``FASTLORA_GPU_TESTS_ON_CPU=1`` asks for their dry run: the same tests on CPU through the interpreter, every
shape scaled down (``tests/gpu_cases.py``).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("FASTLORA_BACKEND", None)

import pytest  # noqa: E402
from gpu_cases import DRY_RUN  # noqa: E402  (imports torch only)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or DRY_RUN:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    return DEVICE
