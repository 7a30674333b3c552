"""Benchmark fixtures: the device, the ceilings measured once per run, and the extra
fields (versions, device, ceilings) written into pytest-benchmark's JSON.

Triton kernels are compiled for the GPU here: this conftest does NOT set
TRITON_INTERPRET (tests/conftest.py does, for the CPU test suite)."""

import platform

import bench_ceilings
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_CEILINGS = {}


@pytest.fixture(scope="session")
def device() -> str:
    return DEVICE


@pytest.fixture(scope="session")
def ceilings() -> dict:
    """Copy bandwidth and matmul throughput of this device, measured in this run."""
    if not _CEILINGS:
        _CEILINGS.update(bench_ceilings.measure(DEVICE))
    return _CEILINGS


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "liger_kernel"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "unknown")
        except Exception:  # not installed / not importable here
            out[name] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["lima"] = {
        "device": bench_ceilings.device_name(DEVICE),
        "versions": _versions(),
        "ceilings": dict(_CEILINGS),
    }
