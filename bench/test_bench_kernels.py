"""Kernel benchmarks: each lima_kernels op, forward / backward / both, against the plain
torch reference in eager mode, torch.compile of that reference, native-torch variants where
one is the usual practice (torch's own dropout RNG; HF's bf16 logits for the loss), and
Liger-Kernel when it is importable.

Timing: every round runs the op once after an L2 flush (a 256 MiB write), timed by CUDA
events (wall clock on CPU); the median is stored in `extra_info["median_ms"]` next to the
bytes moved or FLOPs, the fraction of the copy bandwidth / matmul throughput measured in
the same run (bench_ceilings.py), and the peak extra CUDA memory of a round
(torch.cuda.max_memory_allocated minus what was allocated before it). pytest-benchmark's
own statistics (wall time of the same rounds, synchronized) are kept as well.

On CPU the Triton, Liger and torch.compile rows are skipped (Triton timings need a GPU;
interpreted kernels say nothing about speed), and the eager references run at small
shapes so that `pytest bench/` still measures something; see bench/README.md.
"""

import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import lima_kernels
from lima_kernels import reference as ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
EPS = 1e-6
P_DROP = 0.1
SEED = 1234

try:
    from liger_kernel.transformers import functional as liger_functional
except Exception as err:  # not installed, or fails to import on this machine
    liger_functional = None
    LIGER_ERROR = f"{type(err).__name__}: {err}"
else:
    LIGER_ERROR = None

SKIP_TRITON_CPU = "Triton timings need a CUDA GPU: run bench/gpu_check.sh on the GPU machine"
SKIP_COMPILE_CPU = "torch.compile rows run on the GPU only (inductor compile time on 2 shared CPU cores)"

# ----------------------------------------------------------------------------------------
# The ops: shapes, inputs, implementations, and the traffic / work each mode must do
# ----------------------------------------------------------------------------------------


def _randn(*shape, grad=False):
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE).requires_grad_(grad)


def _elem() -> int:
    return torch.finfo(DTYPE).bits // 8


# Each op: {"shapes": [...], "make": shape -> (grad_inputs, other), "impls": {name: fn},
#           "bytes" or "flops": (shape, mode) -> number}. fn(*grad_inputs, *other) returns
# the output tensor(s) whose gradient the backward takes.

def _rms_make(shape):
    tokens, hidden = shape
    return (_randn(tokens, hidden, grad=True), _randn(hidden, grad=True)), ()


def _rms_bytes(shape, mode):
    tokens, hidden = shape
    per_mode = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}  # x in, y out | dy, x in, dx out
    return per_mode[mode] * tokens * hidden * _elem()


def _rotary_make(shape):
    tokens, heads, head_dim = shape
    positions = torch.arange(tokens, device=DEVICE) % 2048  # packed rows restart at 2048
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim)
    freqs = positions[:, None].float() * inv_freq  # [T, D / 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    return (_randn(tokens, heads, head_dim, grad=True),), (emb.cos().to(DTYPE), emb.sin().to(DTYPE))


def _rotary_bytes(shape, mode):
    tokens, heads, head_dim = shape
    one_pass = (2 * tokens * heads * head_dim + 2 * tokens * head_dim) * _elem()  # x in/out + cos, sin
    return {"fwd": 1, "bwd": 1, "fwd+bwd": 2}[mode] * one_pass


def _liger_rope(q, cos, sin):
    tokens, heads, head_dim = q.shape
    q4 = q.unsqueeze(0).transpose(1, 2)  # [T, H, D] -> [1, H, T, D] (Liger's layout, a view)
    k4 = torch.zeros(1, 1, tokens, head_dim, device=q.device, dtype=q.dtype)  # Liger rotates q and k
    q_out, _ = liger_functional.liger_rope(q4, k4, cos[None], sin[None])
    return q_out


def _dropout_make(shape):
    tokens, hidden = shape
    return (_randn(tokens, hidden, grad=True), _randn(tokens, hidden, grad=True)), ()


def _dropout_bytes(shape, mode):
    tokens, hidden = shape
    per_mode = {"fwd": 3, "bwd": 2, "fwd+bwd": 5}  # x, r in, y out | dy in, dx out
    return per_mode[mode] * tokens * hidden * _elem()


def _fused_make(shape):
    tokens, hidden = shape
    return (_randn(tokens, hidden, grad=True), _randn(tokens, hidden, grad=True), _randn(hidden, grad=True)), ()


def _fused_bytes(shape, mode):
    tokens, hidden = shape
    per_mode = {"fwd": 4, "bwd": 5, "fwd+bwd": 9}  # x, r in, z, y out | dz, dy, z in, dx, dr out
    return per_mode[mode] * tokens * hidden * _elem()


def _lce_make(shape):
    tokens, hidden, vocab = shape
    labels = torch.randint(0, vocab, (tokens,), device=DEVICE)
    labels[torch.rand(tokens, device=DEVICE) < 0.1] = -100  # some prompt tokens
    h = (torch.randn(tokens, hidden, device=DEVICE) * 0.5).to(DTYPE).requires_grad_()
    w = (torch.randn(vocab, hidden, device=DEVICE) * hidden**-0.5).to(DTYPE).requires_grad_()
    return (h, w), (labels,)


def _lce_flops(shape, mode):
    tokens, hidden, vocab = shape
    return {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[mode] * tokens * hidden * vocab


OPS = {
    "rms_norm": {
        "shapes": [(4096, 4096), (16384, 8192)] if CUDA else [(512, 1024)],
        "make": _rms_make,
        "bytes": _rms_bytes,
        "impls": {
            "lima": lambda x, w: lima_kernels.rms_norm(x, w, EPS),
            "eager": lambda x, w: ref.rms_norm(x, w, EPS),
            "compile": lambda x, w: ref.rms_norm(x, w, EPS),
            "liger": lambda x, w: liger_functional.liger_rms_norm(x, w, EPS, casting_mode="llama", in_place=False),
        },
    },
    "rotary": {
        "shapes": [(4096, 32, 128), (16384, 64, 128)] if CUDA else [(512, 8, 64)],
        "make": _rotary_make,
        "bytes": _rotary_bytes,
        "impls": {
            "lima": lambda q, cos, sin: lima_kernels.rotary(q, cos, sin),
            "eager": lambda q, cos, sin: ref.rotary(q, cos, sin),
            "compile": lambda q, cos, sin: ref.rotary(q, cos, sin),
            "liger": _liger_rope,
        },
    },
    "dropout_add": {
        "shapes": [(4096, 4096), (16384, 8192)] if CUDA else [(512, 1024)],
        "make": _dropout_make,
        "bytes": _dropout_bytes,
        "impls": {
            "lima": lambda x, r: lima_kernels.dropout_add(x, r, P_DROP, SEED, 0),
            "eager": lambda x, r: ref.dropout_add(x, r, P_DROP, SEED, 0),
            "eager_native": lambda x, r: r + F.dropout(x, P_DROP),  # torch RNG, stored mask
            "compile": lambda x, r: ref.dropout_add(x, r, P_DROP, SEED, 0),
        },
    },
    "dropout_add_rms_norm": {
        "shapes": [(4096, 4096), (16384, 8192)] if CUDA else [(512, 1024)],
        "make": _fused_make,
        "bytes": _fused_bytes,
        "impls": {
            "lima": lambda x, r, w: lima_kernels.dropout_add_rms_norm(x, r, w, P_DROP, SEED, 0, EPS),
            "eager": lambda x, r, w: ref.dropout_add_rms_norm(x, r, w, P_DROP, SEED, 0, EPS),
            "eager_native": lambda x, r, w: _native_dropout_add_rms_norm(x, r, w),
            "compile": lambda x, r, w: ref.dropout_add_rms_norm(x, r, w, P_DROP, SEED, 0, EPS),
        },
    },
    "linear_cross_entropy": {
        "shapes": [(16384, 4096, 32000), (8192, 8192, 128256)] if CUDA else [(256, 256, 4096)],
        "make": _lce_make,
        "flops": _lce_flops,
        "impls": {
            "lima": lambda h, w, y: lima_kernels.linear_cross_entropy(h, w, y)[0],
            "eager": lambda h, w, y: ref.linear_cross_entropy(h, w, y)[0],  # fp32 logits
            "eager_hf": lambda h, w, y: F.cross_entropy((h @ w.t()).float(), y, reduction="sum"),  # bf16 logits
            "compile": lambda h, w, y: ref.linear_cross_entropy(h, w, y)[0],
            "liger": lambda h, w, y: liger_functional.liger_fused_linear_cross_entropy(h, w, y, reduction="sum"),
        },
    },
}


def _native_dropout_add_rms_norm(x, r, w):
    z = r + F.dropout(x, P_DROP)
    return z, ref.rms_norm(z, w, EPS)


# ----------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------

_COMPILED = {}
_L2_FLUSH = {}


def _flush_l2():
    if CUDA:
        buf = _L2_FLUSH.setdefault("buf", torch.empty(256 * 2**20, dtype=torch.int8, device="cuda"))
        buf.zero_()


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _impl_fn(op_name, impl, shape):
    fn = OPS[op_name]["impls"][impl]
    if impl == "compile":
        key = (op_name, shape)
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(fn, dynamic=False)
        fn = _COMPILED[key]
    return fn


def _as_tuple(outs):
    return tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)


def _measure(benchmark, fn, grad_inputs, other, mode, rounds):
    """Run `rounds` timed rounds (after 2 warm-up rounds) through pytest-benchmark; return
    (median ms of the timed region, peak extra CUDA bytes of a round or None)."""
    # Output gradients are made once, outside the timed region (never zeros).
    probe = _as_tuple(fn(*grad_inputs, *other))
    grad_outs = tuple(torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in probe)
    del probe
    times, peaks, base = [], [], {}

    def setup():
        outs = _as_tuple(fn(*grad_inputs, *other)) if mode == "bwd" else None
        _flush_l2()
        _sync()
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
            base["bytes"] = torch.cuda.memory_allocated()
        return (outs,), {}

    def run(outs):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        if mode == "fwd":
            fn(*grad_inputs, *other)
        elif mode == "bwd":
            torch.autograd.grad(outs, grad_inputs, grad_outs)
        else:
            torch.autograd.grad(_as_tuple(fn(*grad_inputs, *other)), grad_inputs, grad_outs)
        if CUDA:
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
            peaks.append(torch.cuda.max_memory_allocated() - base["bytes"])
        else:
            times.append((time.perf_counter() - t0) * 1e3)

    benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=2, iterations=1)
    timed = times[2:]  # pedantic runs the 2 warm-up rounds first
    return statistics.median(timed), (max(peaks[2:]) if peaks else None)


def _cases():
    for op_name, op in OPS.items():
        for shape in op["shapes"]:
            for mode in ("fwd", "bwd", "fwd+bwd"):
                for impl in op["impls"]:
                    yield pytest.param(op_name, shape, mode, impl,
                                       id=f"{op_name}-{'x'.join(map(str, shape))}-{mode}-{impl}")


@pytest.mark.parametrize("op_name,shape,mode,impl", list(_cases()))
def test_bench(benchmark, ceilings, op_name, shape, mode, impl):
    if not CUDA and impl in ("lima", "liger"):
        pytest.skip(SKIP_TRITON_CPU)
    if not CUDA and impl == "compile":
        pytest.skip(SKIP_COMPILE_CPU)
    if impl == "liger" and liger_functional is None:
        pytest.skip(f"liger-kernel not importable ({LIGER_ERROR})")
    op = OPS[op_name]
    torch.manual_seed(0)
    grad_inputs, other = op["make"](shape)
    fn = _impl_fn(op_name, impl, shape)
    is_lce = "flops" in op
    rounds = (5 if is_lce else 20) if CUDA else 5

    benchmark.group = f"{op_name} {'x'.join(map(str, shape))} {mode}"
    median_ms, peak = _measure(benchmark, fn, grad_inputs, other, mode, rounds)

    info = {"op": op_name, "shape": list(shape), "mode": mode, "impl": impl, "dtype": str(DTYPE),
            "device": ceilings["device"], "median_ms": median_ms}
    if is_lce:
        flops = op["flops"](shape, mode)
        info["model_flops"] = flops
        info["TFLOPs"] = flops / (median_ms * 1e-3) / 1e12
        info["fraction_of_matmul_peak"] = info["TFLOPs"] / ceilings["matmul_TFLOPs"]
        info["full_logits_bytes_fp32"] = shape[0] * shape[2] * 4
    else:
        moved = op["bytes"](shape, mode)
        info["bytes_moved"] = moved
        info["GBps"] = moved / (median_ms * 1e-3) / 1e9
        info["fraction_of_copy_bandwidth"] = info["GBps"] / ceilings["copy_bandwidth_GBps"]
    if peak is not None:
        info["peak_extra_MiB"] = peak / 2**20
    benchmark.extra_info.update(info)
