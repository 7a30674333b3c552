"""Fused AdamW: the native op `torch.ops.lima.fused_adamw_` (csrc/, built into lima_core/_C.so)
and `FusedAdamW`, a torch.optim.Optimizer that drives it.

One call is one AdamW step over a flat contiguous fp32 tensor, in place on the parameter and
both moments, with torch.optim.AdamW's formula and order of operations (csrc/adamw.h), and
optionally writes a bf16/fp16 compute copy of the new parameter in the same pass (rounded to
nearest even, or stochastically when a seed is given). Gradients may be fp32 or bf16; moments
fp32, or bf16 stored with stochastic rounding.

`available()` says whether the library loaded; `unavailable_reason()` says why not (callers
then fall back to torch.optim.AdamW: docs/design.md, decision 9); both come from lima_core.native,
which loads the library once for every native op. Known limit: with bf16 moments and
no seed, every tensor's moment rounding draws from the same (step, element index) stream, so
rounding errors are correlated across tensors (each is still unbiased).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

# Re-exported (fused_adamw.available() is this module's API): lima_core.native loads the
# library once for every native op.
from lima_core.native import available, unavailable_reason

if available():

    @torch.library.register_fake("lima::fused_adamw_")
    def _fused_adamw_fake(param, grad, exp_avg, exp_avg_sq, param_copy, *, lr, beta1, beta2, eps,
                          weight_decay, step, seed=None):
        """Shape and dtype rules only (the op returns nothing and writes its inputs in place)."""
        torch._check(param.dtype == torch.float32, lambda: "fused_adamw_: param must be float32")
        torch._check(grad.dtype in (torch.float32, torch.bfloat16),
                     lambda: "fused_adamw_: grad must be float32 or bfloat16")
        torch._check(exp_avg.dtype == exp_avg_sq.dtype and exp_avg.dtype in (torch.float32, torch.bfloat16),
                     lambda: "fused_adamw_: exp_avg and exp_avg_sq must both be float32 or bfloat16")
        tensors = [grad, exp_avg, exp_avg_sq]
        if param_copy is not None:
            torch._check(param_copy.dtype in (torch.bfloat16, torch.float16),
                         lambda: "fused_adamw_: param_copy must be bfloat16 or float16")
            tensors.append(param_copy)
        for t in tensors:
            torch._check(t.numel() == param.numel(), lambda: "fused_adamw_: sizes differ from param")
        return None


def fused_adamw_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 param_copy: torch.Tensor | None = None, *, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float, step: int, seed: int | None = None) -> None:
    """One AdamW step on flat contiguous tensors (see the module docstring); `step` counts this one."""
    torch.ops.lima.fused_adamw_(param, grad, exp_avg, exp_avg_sq, param_copy, lr=lr, beta1=beta1,
                                beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, seed=seed)


class FusedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update with one fused native call per tensor.

    params: contiguous fp32 tensors (ordinary parameters, or flat FSDP master shards) whose
    `.grad` is set before `step()` (or passed to it, fp32 or bf16); param groups and
    per-step `param_groups[i]["lr"]` work as in torch. copies: {param: bf16/fp16 tensor} compute
    copies written in the same pass. moment_dtype: torch.float32, or torch.bfloat16 (stored with
    stochastic rounding). seed: when given, copies are rounded stochastically, keyed by (seed,
    tensor index, step, element). The state (step, exp_avg, exp_avg_sq) has torch.optim.AdamW's
    keys and holds tensors only.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, copies: Mapping[torch.Tensor, torch.Tensor] | None = None,
                 moment_dtype: torch.dtype = torch.float32, seed: int | None = None):
        if not available():
            raise RuntimeError(unavailable_reason())
        if moment_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"moment_dtype must be torch.float32 or torch.bfloat16, got {moment_dtype}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        for i, p in enumerate(self._all_params()):
            if p.dtype != torch.float32 or not p.is_contiguous():
                raise ValueError(f"FusedAdamW: parameter {i} must be contiguous float32, got "
                                 f"{p.dtype}{'' if p.is_contiguous() else ', non-contiguous'}")
        self.copies = dict(copies or {})
        self.moment_dtype = moment_dtype
        self.seed = seed

    def _all_params(self) -> Iterable[torch.Tensor]:
        return (p for group in self.param_groups for p in group["params"])

    @torch.no_grad()
    def step(self, closure=None, *, grads: Mapping[torch.Tensor, torch.Tensor] | None = None):
        """One step; `grads` ({param: gradient}) overrides `.grad`, e.g. with bf16 gradients,
        which torch does not allow in the `.grad` of an fp32 tensor."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, (group, p) in enumerate((g, p) for g in self.param_groups for p in g["params"]):
            grad = p.grad if grads is None else grads.get(p, p.grad)
            if grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)  # as torch.optim.AdamW: an fp32 CPU tensor
                state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype, memory_format=torch.contiguous_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype,
                                                       memory_format=torch.contiguous_format)
            state["step"] += 1
            copy = self.copies.get(p)
            beta1, beta2 = group["betas"]
            # One stream per tensor (the op mixes in the step and the element index).
            seed = None if self.seed is None else (self.seed * 1_000_003 + index) % (1 << 63)
            torch.ops.lima.fused_adamw_(  # flat views, each [numel]
                p.view(-1), grad.view(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1),
                None if copy is None else copy.view(-1),
                lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], step=int(state["step"]), seed=seed)
            # The native op writes through raw pointers: count its in-place writes, as torch's own
            # in-place ops do (autograd's checks and FSDP's stale-copy check read these counts).
            torch.autograd.graph.increment_version([p] if copy is None else [p, copy])
        return loss

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # torch casts loaded moments to the parameter's dtype (fp32); keep ours.
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.moment_dtype).contiguous()
