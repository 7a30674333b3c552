"""Fused linear + cross-entropy, chunked over tokens so [tokens, vocab] logits never exist.

What: (loss_sum, n_targets) = (sum over rows with labels != ignore_index of
logsumexp(hidden @ weight.T) - logit[label], number of such rows). For each chunk of C
tokens:
  1. logits = hidden_c @ weight.T with cuBLAS into an fp32 [C, V] buffer (bf16/fp16
     operands are multiplied exactly and accumulated in fp32; out_dtype=float32 on CUDA);
  2. a Triton kernel computes each row's loss (online max/sum-exp over vocab blocks) and
     overwrites the logits IN PLACE with their gradient softmax - onehot(label) (zero on
     ignored rows);
  3. if gradients are needed, grad_hidden_c = g @ weight and grad_weight += g.T @ hidden_c
     with cuBLAS, g rounded to the weight dtype as in any bf16 backward; grad_weight is
     accumulated across chunks in fp32 (for low-precision weights, vocab block by block so
     the fp32 temporary stays <= 16M elements) and cast to the weight dtype once at the end.
The gradients are thus computed during forward and saved; backward only scales them by the
incoming gradient of loss_sum (the standard trick: no logits kept for backward).

Peak extra memory: one fp32 [C, V] logits chunk (+ its low-precision copy), the gradients
themselves, and for low-precision weights an fp32 [V, H] accumulator (the price of fp32
accumulation across chunks: 2x the bf16 weight). The default C makes the chunk about as
large as hidden (Liger-Kernel's rule), at least 128 rows and at most 2**26 logits.

Reference: `lima_kernels.reference.linear_cross_entropy` (fp32 logits, torch
cross_entropy with reduction="sum").

Limits: hidden and weight share a dtype; labels are int64 in [0, V) or ignore_index (out of
range labels are not checked); no label smoothing or z-loss; no double backward; the
gradients are computed for whichever of hidden/weight require grad when the forward runs.
"""

import math

import torch
import triton
import triton.language as tl

from .._utils import check_device, interpreting

# ----------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------


@triton.jit
def _cross_entropy_kernel(
    LOGITS, LABELS, LOSS,
    n_rows, V, stride_l, ignore_index,
    COMPUTE_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Per row: LOSS = logsumexp(logits) - logits[label] (0 if ignored); with COMPUTE_GRAD
    the fp32 logits row is overwritten by softmax - onehot(label) (zeros if ignored)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_mask = rows < n_rows
    label = tl.load(LABELS + rows, mask=row_mask, other=ignore_index)  # [BLOCK_M] int64
    valid = (label != ignore_index) & row_mask
    row_ptr = LOGITS + rows.to(tl.int64) * stride_l  # [BLOCK_M] row starts

    # Pass 1: online max and sum of exp over vocab blocks (finite start: no inf - inf).
    m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    s = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)  # [BLOCK_V]
        mask = row_mask[:, None] & (cols < V)[None, :]  # [BLOCK_M, BLOCK_V]
        logit = tl.load(row_ptr[:, None] + cols[None, :], mask=mask, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(logit, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logit - m_new[:, None]), axis=1)
        m = m_new

    # s >= 1 on real rows (the max term is exp(0)); only masked-off rows have s == 0.
    s = tl.maximum(s, 1.0)
    safe_label = tl.where(valid, label, 0)
    target = tl.load(row_ptr + safe_label, mask=valid, other=0.0)  # [BLOCK_M] logit[label]
    lse = m + tl.log(s)
    tl.store(LOSS + rows, tl.where(valid, lse - target, 0.0), mask=row_mask)

    # Pass 2: gradient of the row's loss w.r.t. its logits, written over the logits.
    if COMPUTE_GRAD:
        inv_s = 1.0 / s
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)  # [BLOCK_V]
            mask = row_mask[:, None] & (cols < V)[None, :]  # [BLOCK_M, BLOCK_V]
            logit = tl.load(row_ptr[:, None] + cols[None, :], mask=mask, other=float("-inf"))
            prob = tl.exp(logit - m[:, None]) * inv_s[:, None]
            grad = tl.where(cols[None, :] == safe_label[:, None], prob - 1.0, prob)
            grad = tl.where(valid[:, None], grad, 0.0)
            tl.store(row_ptr[:, None] + cols[None, :], grad, mask=mask)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------

_GRAD_WEIGHT_TEMP_ELEMS = 2**24  # fp32 temporary (64 MiB) of the low-precision grad_weight path
_MAX_CHUNK_LOGITS = 2**26  # logits per chunk at most (256 MiB in fp32)


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result; bf16/fp16 operands are multiplied exactly and summed in
    fp32 (cuBLAS out_dtype on CUDA; an fp32 upcast where that overload is missing, i.e. CPU)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def cross_entropy_inplace(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, compute_grad: bool, loss: torch.Tensor
) -> None:
    """logits [C, V] fp32 contiguous (overwritten by its gradient if compute_grad),
    labels [C] -> per-row losses written into loss [C] fp32 (contiguous)."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    if interpreting():
        block_m, block_v, num_warps = 16, min(triton.next_power_of_2(vocab), 1024), 1
    else:
        block_m, block_v, num_warps = 1, min(triton.next_power_of_2(vocab), 4096), 8
    _cross_entropy_kernel[(triton.cdiv(rows, block_m),)](
        logits, labels, loss, rows, vocab, logits.stride(0), ignore_index,
        COMPUTE_GRAD=compute_grad, BLOCK_M=block_m, BLOCK_V=block_v, num_warps=num_warps,
    )


def default_chunk_size(tokens: int, hidden: int, vocab: int) -> int:
    """Rows per chunk: the [C, V] logits chunk about as large as hidden [T, H] (Liger-Kernel's
    rule), at least 128 rows (GEMM efficiency), at most _MAX_CHUNK_LOGITS logits."""
    chunk = triton.next_power_of_2(max(1, math.ceil(tokens / math.ceil(vocab / max(hidden, 1)))))
    cap = max(128, _MAX_CHUNK_LOGITS // max(vocab, 1))
    return max(1, min(tokens, max(128, min(chunk, cap))))


def linear_cross_entropy_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    grad_hidden_needed: bool,
    grad_weight_needed: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [T, H], weight [V, H], labels [T] -> (loss_sum [], n_targets [] int64,
    grad_hidden [T, H] or [0], grad_weight [V, H] or [0]), gradients of loss_sum.
    chunk_size <= 0 picks default_chunk_size."""
    check_device(hidden, weight, labels)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    labels = labels.contiguous()
    tokens, hdim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    if chunk_size <= 0:
        chunk_size = default_chunk_size(tokens, hdim, vocab)
    low_precision = weight.dtype != torch.float32

    loss_rows = torch.empty((tokens,), dtype=torch.float32, device=dev)  # [T]
    grad_hidden = torch.empty((tokens, hdim) if grad_hidden_needed else (0,), dtype=hidden.dtype, device=dev)
    if grad_weight_needed:
        grad_weight_acc = torch.zeros((vocab, hdim), dtype=torch.float32, device=dev)  # [V, H] fp32
    vocab_block = max(1, _GRAD_WEIGHT_TEMP_ELEMS // max(hdim, 1))
    compute_grad = grad_hidden_needed or grad_weight_needed

    for c0 in range(0, tokens, chunk_size):
        c1 = min(c0 + chunk_size, tokens)
        h_c = hidden[c0:c1]  # [C, H]
        logits = _mm_fp32_out(h_c, weight.t())  # [C, H] @ [H, V] -> [C, V] fp32
        cross_entropy_inplace(logits, labels[c0:c1], ignore_index, compute_grad, loss_rows[c0:c1])
        if not compute_grad:
            continue
        g = logits.to(weight.dtype) if low_precision else logits  # [C, V] dloss/dlogits
        if grad_hidden_needed:
            torch.mm(g, weight, out=grad_hidden[c0:c1])  # [C, V] @ [V, H] -> [C, H]
        if grad_weight_needed:
            if not low_precision:
                grad_weight_acc.addmm_(g.t(), h_c)  # [V, C] @ [C, H] -> [V, H]
            else:
                for v0 in range(0, vocab, vocab_block):
                    v1 = min(v0 + vocab_block, vocab)
                    # [Vb, C] @ [C, H] -> [Vb, H] in fp32, added to the fp32 accumulator
                    grad_weight_acc[v0:v1] += _mm_fp32_out(g[:, v0:v1].t(), h_c)
        del logits, g

    loss_sum = loss_rows.sum()  # [] fp32, deterministic
    n_targets = (labels != ignore_index).sum()  # [] int64
    if grad_weight_needed:
        grad_weight = grad_weight_acc if not low_precision else grad_weight_acc.to(weight.dtype)
    else:
        grad_weight = torch.empty((0,), dtype=weight.dtype, device=dev)
    return loss_sum, n_targets, grad_hidden, grad_weight


# ----------------------------------------------------------------------------------------
# Autograd: torch.library custom op; backward scales the saved gradients
# ----------------------------------------------------------------------------------------

_linear_cross_entropy_op = torch.library.custom_op(
    "lima_kernels::linear_cross_entropy", linear_cross_entropy_fwd, mutates_args=()
)


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, labels, ignore_index, grad_hidden_needed, grad_weight_needed, chunk_size):
    loss_sum = hidden.new_empty((), dtype=torch.float32)
    n_targets = hidden.new_empty((), dtype=torch.int64)
    grad_hidden = hidden.new_empty(hidden.shape if grad_hidden_needed else (0,))
    grad_weight = weight.new_empty(weight.shape if grad_weight_needed else (0,))
    return loss_sum, n_targets, grad_hidden, grad_weight


def _lce_setup_context(ctx, inputs, output):
    _hidden, _weight, _labels, _ii, grad_hidden_needed, grad_weight_needed, _chunk = inputs
    _loss, _n, grad_hidden, grad_weight = output
    ctx.save_for_backward(grad_hidden, grad_weight)
    ctx.needed = (grad_hidden_needed, grad_weight_needed)


def _lce_backward(ctx, d_loss, _d_n, _d_gh, _d_gw):
    grad_hidden, grad_weight = ctx.saved_tensors
    gh = grad_hidden * d_loss if ctx.needed[0] else None  # [T, H] times a 0-dim scale
    gw = grad_weight * d_loss if ctx.needed[1] else None  # [V, H] times a 0-dim scale
    return gh, gw, None, None, None, None, None


_linear_cross_entropy_op.register_autograd(_lce_backward, setup_context=_lce_setup_context)


# ----------------------------------------------------------------------------------------
# Public function and module
# ----------------------------------------------------------------------------------------


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    *,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropies of hidden @ weight.T against labels != ignore_index, their
    count). hidden [..., H], weight [V, H], labels [...] aligned to hidden (no shift).
    chunk_size: tokens per chunk (default: logits chunk about the size of hidden)."""
    hdim = hidden.shape[-1]
    h2 = hidden.reshape(-1, hdim)  # [..., H] -> [T, H]
    y = labels.reshape(-1)  # [...] -> [T]
    if y.shape[0] != h2.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    grad_on = torch.is_grad_enabled()
    loss_sum, n_targets, _gh, _gw = _linear_cross_entropy_op(
        h2, weight, y, int(ignore_index), grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
        0 if chunk_size is None else int(chunk_size),  # 0: chosen from the concrete shapes
    )
    return loss_sum, n_targets


class LinearCrossEntropy(torch.nn.Module):
    """An lm_head (weight [vocab, hidden], no bias) whose forward returns the summed
    cross-entropy and the target count instead of logits."""

    def __init__(self, hidden_size: int, vocab_size: int, ignore_index: int = -100, device=None, dtype=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(vocab_size, hidden_size, device=device, dtype=dtype))
        self.ignore_index = ignore_index
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.normal_(self.weight, std=self.weight.shape[1] ** -0.5)

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return linear_cross_entropy(hidden, self.weight, labels, self.ignore_index)
