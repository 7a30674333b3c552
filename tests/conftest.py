"""Test-wide setup. TRITON_INTERPRET must be set before triton is first imported (it reads it
once): on this CPU machine the Triton kernels run in the interpreter. bench/gpu_check.sh sets
TRITON_INTERPRET=0 to compile real CUDA kernels."""

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import HF_CONFIGS, make_hf_model  # after the setdefault: through lima_core, helpers may import triton


@pytest.fixture(params=list(HF_CONFIGS))
def hf_checkpoint(request, tmp_path):
    """(transformers model, folder it saved itself to)."""
    model = make_hf_model(request.param)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"
