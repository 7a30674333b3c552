"""The whole compile matrix of `python bench/aot.py`: every Triton kernel of
lima_kernels at LLaMA shapes (hidden 4096 / 8192, and 16384 for the RMSNorm kernels; head_dim
128; vocab 32000 / 128256; bf16 and fp32) and csrc/*.cu (with nvcc), for sm_80 and sm_90,
without a GPU. Prints the table (registers, local memory, shared memory, blocks per SM) and
writes the rows to bench/results/<date>-aot.json; fails on a compile error, on a kernel that
cannot run, or on a spill at hidden <= 8192. A compile, not a timing: the same on any machine
with the same triton and CUDA toolkit."""

import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
AOT = Path(__file__).resolve().parent / "aot.py"


def test_aot_full_matrix(capsys):
    RESULTS.mkdir(exist_ok=True)
    report = RESULTS / f"{date.today().isoformat()}-aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(AOT), "--json", str(report)],
        env=env, capture_output=True, text=True, timeout=3600,
    )
    with capsys.disabled():
        wall = time.perf_counter() - start
        print(f"\n{proc.stdout}\npython bench/aot.py: {wall:.1f} s wall; rows in {report}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
