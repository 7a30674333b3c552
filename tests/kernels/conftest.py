"""Kernel tests run the Triton kernels on CPU through Triton's interpreter
(TRITON_INTERPRET is set by tests/conftest.py, before triton is imported)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same torch RNG state (inputs are reproducible)."""
    torch.manual_seed(0)
    yield
