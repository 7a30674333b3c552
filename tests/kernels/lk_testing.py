"""Shared checks for the kernel tests (STYLE.md item 13: the three-way comparison)."""

import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def ulp_atol(dtype: torch.dtype, gold: torch.Tensor) -> float:
    """One ulp of `dtype` at the scale of `gold`.

    Reason: the interpreter truncates fp32 -> bf16/fp16 casts instead of rounding (kernels/README.md),
    so a kernel value may be one ulp off where torch's rounding is half an ulp off.
    """
    return torch.finfo(dtype).eps * max(gold.abs().max().item(), 1e-30)


def assert_three_way(kernel: torch.Tensor, torch_same: torch.Tensor, gold: torch.Tensor, atol: float, what: str):
    """The kernel's error against the high-precision gold is at most twice the error of the
    same-dtype torch run plus `atol`; shapes and dtypes equal the torch run's."""
    assert kernel.shape == torch_same.shape, f"{what}: shape {kernel.shape} != {torch_same.shape}"
    assert kernel.dtype == torch_same.dtype, f"{what}: dtype {kernel.dtype} != {torch_same.dtype}"
    k_err = max_err(kernel, gold)
    t_err = max_err(torch_same, gold)
    assert k_err <= 2 * t_err + atol, (
        f"{what}: kernel error {k_err:.3g} > 2 x torch error {t_err:.3g} + atol {atol:.3g}"
    )


def leaves(t: torch.Tensor) -> list:
    """Three leaf copies of t: for the kernel, for the same-dtype torch run (both in t's
    dtype) and for the fp64 gold (so the gold's gradients are not rounded to t's dtype)."""
    return [t.clone().requires_grad_(), t.clone().requires_grad_(), t.double().requires_grad_()]
