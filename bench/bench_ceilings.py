"""The two ceilings every benchmark is reported against, measured on this device in the
same run: device-to-device copy bandwidth (bytes read + written per second) and bf16
matmul throughput (8192^3, TFLOP/s). Run as a script to print them as JSON."""

import json
import statistics
import time

import torch


def _median_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median wall time of fn in ms: CUDA events on a GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: str) -> float:
    """GB/s (1e9 bytes) of dst.copy_(src): 2 x nbytes moved per copy. 1 GiB buffers on a
    GPU (far larger than L2), 64 MiB on CPU."""
    nbytes = 2**30 if device == "cuda" else 2**26
    src = torch.randn(nbytes // 4, device=device)  # non-zero data
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), reps=20 if device == "cuda" else 5)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(device: str) -> float:
    """Dense matmul TFLOP/s: bf16 8192^3 on a GPU; fp32 1024^3 on CPU (a sanity figure)."""
    if device == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 1024, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = _median_ms(lambda: a @ b, reps=20 if device == "cuda" else 3)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return "cpu"


def measure(device: str) -> dict:
    return {
        "device": device_name(device),
        "copy_bandwidth_GBps": copy_bandwidth_gbs(device),
        "matmul_TFLOPs": matmul_tflops(device),
        "matmul": "bf16 8192^3" if device == "cuda" else "fp32 1024^3",
    }


if __name__ == "__main__":
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(json.dumps(measure(dev), indent=2))
