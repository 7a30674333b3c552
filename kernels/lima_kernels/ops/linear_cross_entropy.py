"""Fused linear + cross-entropy, chunked over tokens so [tokens, vocab] logits never exist.

What: (loss_sum, n_targets) = (sum over rows with labels != ignore_index of
logsumexp(hidden @ weight.T) - logit[label], number of such rows). For each chunk of C
tokens:
  1. logits = hidden_c @ weight.T with cuBLAS into an fp32 [C, V] buffer (bf16/fp16
     operands are multiplied exactly and accumulated in fp32; out_dtype=float32 on CUDA);
  2. a Triton kernel computes each row's loss (online max/sum-exp over vocab blocks) and,
     if gradients are needed, writes the logits' gradient softmax - onehot(label) (zero on
     ignored rows) directly in the operands' dtype: over the fp32 logits in place when the
     operands are fp32, else into a [C, V] bf16/fp16 buffer (rounded once, in the kernel);
  3. grad_hidden_c = g @ weight, and grad_weight += g.T @ hidden_c straight into ONE fp32
     [V, H] accumulator: on CUDA cuBLAS adds the bf16/fp16 product into it as it writes
     (addmm with out_dtype=float32, out=the accumulator, beta=1; beta=0 on the first chunk,
     so it is never zero-filled), with no per-chunk fp32 temporary and no separate add. It is
     cast to the weight dtype once at the end.
The gradients are thus computed during forward and saved; backward only scales them by the
incoming gradient of loss_sum (the standard trick: no logits kept for backward).

Autocast: the logits are fp32 whatever autocast says. Under torch.autocast the public
function casts hidden and weight to the autocast dtype, as autocast would cast a matmul's
operands, and the op computes with autocast disabled. The casts are ordinary differentiable
ops, so the gradients come back in the dtypes of the original inputs.

Labels: a label outside [0, V) that is not ignore_index is an error, raised by a device-side
assert (torch._assert_async: no host sync on CUDA, where it surfaces at the next sync; a
RuntimeError at once on CPU). The kernel never reads outside a row: it treats such a label
as ignored.

Peak extra memory: one fp32 [C, V] logits chunk (+ its bf16/fp16 gradient for low-precision
operands), the gradients themselves, and for low-precision weights the fp32 [V, H]
accumulator (the price of fp32 accumulation across chunks: 2x the bf16 weight) plus its
cast at the end. The default C makes the chunk about as large as hidden (Liger-Kernel's
rule), at least 128 rows and at most 2**26 logits.

Reference: `lima_kernels.reference.linear_cross_entropy` (fp32 logits, torch
cross_entropy with reduction="sum").

Limits: hidden and weight share a dtype (outside autocast they are not cast); labels are
int64; no label smoothing or z-loss; no double backward; the gradients are computed for
whichever of hidden/weight require grad when the forward runs. On CPU (the interpreter)
torch has no out_dtype matmul, so low-precision operands are upcast to fp32 for the GEMMs
(the same exact products and fp32 sums, through fp32 copies of the operands), and the
interpreter truncates the kernel's fp32 -> bf16/fp16 stores where CUDA rounds to nearest.
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
    LOGITS, GRAD, LABELS, LOSS,
    n_rows, V, stride_l, stride_g, ignore_index,
    COMPUTE_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Per row: LOSS = logsumexp(logits) - logits[label] (0 if ignored); with COMPUTE_GRAD
    GRAD = softmax - onehot(label) (zeros if ignored), stored in GRAD's dtype. GRAD may be
    LOGITS itself (fp32, in place): each element is read before it is overwritten."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_mask = rows < n_rows
    label = tl.load(LABELS + rows, mask=row_mask, other=ignore_index)  # [BLOCK_M] int64
    # Out-of-range labels are ignored here (the launcher asserts there are none): never
    # a read outside the row, nor past the buffer at a chunk's last row.
    valid = (label != ignore_index) & (label >= 0) & (label < V) & row_mask
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

    # Pass 2: gradient of the row's loss w.r.t. its logits, rounded once to GRAD's dtype.
    if COMPUTE_GRAD:
        grad_ptr = GRAD + rows.to(tl.int64) * stride_g  # [BLOCK_M] row starts
        inv_s = 1.0 / s
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)  # [BLOCK_V]
            mask = row_mask[:, None] & (cols < V)[None, :]  # [BLOCK_M, BLOCK_V]
            logit = tl.load(row_ptr[:, None] + cols[None, :], mask=mask, other=float("-inf"))
            prob = tl.exp(logit - m[:, None]) * inv_s[:, None]
            grad = tl.where(cols[None, :] == safe_label[:, None], prob - 1.0, prob)
            grad = tl.where(valid[:, None], grad, 0.0)
            tl.store(grad_ptr[:, None] + cols[None, :], grad.to(GRAD.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------

_MAX_CHUNK_LOGITS = 2**26  # logits per chunk at most (256 MiB in fp32)


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result; bf16/fp16 operands are multiplied exactly and summed in
    fp32 (cuBLAS out_dtype on CUDA; an fp32 upcast where that overload is missing, i.e. CPU)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float) -> None:
    """acc = beta * acc + a @ b in place, acc fp32. bf16/fp16 operands on CUDA: cuBLAS adds
    the exact products into acc as it writes (addmm.dtype_out with out=acc), so no fp32
    product is ever stored apart. torch has no CPU kernel for that overload: there the
    operands are upcast (same products and fp32 sums, through fp32 operand copies)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b, beta=beta)
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, beta=beta, out=acc)
    else:
        acc.addmm_(a.float(), b.float(), beta=beta)


def cross_entropy_rows(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, loss: torch.Tensor,
    grad: torch.Tensor | None = None,
) -> None:
    """logits [C, V] fp32 contiguous, labels [C] -> per-row losses written into loss [C]
    fp32; if grad [C, V] is given (logits itself, or a bf16/fp16 buffer), the gradient of
    each row's loss w.r.t. its logits is written into it in its dtype."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    if interpreting():
        block_m, block_v, num_warps = 16, min(triton.next_power_of_2(vocab), 1024), 1
    else:
        block_m, block_v, num_warps = 1, min(triton.next_power_of_2(vocab), 4096), 8
    compute_grad = grad is not None
    grad = grad if compute_grad else logits  # never written when COMPUTE_GRAD is off
    _cross_entropy_kernel[(triton.cdiv(rows, block_m),)](
        logits, grad, labels, loss, rows, vocab, logits.stride(0), grad.stride(0), ignore_index,
        COMPUTE_GRAD=compute_grad, BLOCK_M=block_m, BLOCK_V=block_v, num_warps=num_warps,
    )


def default_chunk_size(tokens: int, hidden: int, vocab: int) -> int:
    """Rows per chunk: the [C, V] logits chunk about as large as hidden [T, H] (Liger-Kernel's
    rule), at least 128 rows (GEMM efficiency), at most _MAX_CHUNK_LOGITS logits."""
    chunk = triton.next_power_of_2(max(1, math.ceil(tokens / math.ceil(vocab / max(hidden, 1)))))
    cap = max(128, _MAX_CHUNK_LOGITS // max(vocab, 1))
    return max(1, min(tokens, max(128, min(chunk, cap))))


def _assert_labels_in_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every label is in [0, vocab) or ignore_index, checked on the device: no host sync."""
    ok = ((labels >= 0) & (labels < vocab)) | (labels == ignore_index)  # [T] bool
    message = f"linear_cross_entropy: labels must be in [0, {vocab}) or ignore_index ({ignore_index})"
    torch._assert_async(ok.all(), message)


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
    chunk_size <= 0 picks default_chunk_size. Runs with autocast off: the logits are fp32."""
    check_device(hidden, weight, labels)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    with torch.autocast(hidden.device.type, enabled=False):
        return _chunked_fwd(hidden.contiguous(), weight.contiguous(), labels.contiguous(), ignore_index,
                            grad_hidden_needed, grad_weight_needed, chunk_size)


def _chunked_fwd(hidden, weight, labels, ignore_index, grad_hidden_needed, grad_weight_needed, chunk_size):
    tokens, hdim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    if chunk_size <= 0:
        chunk_size = default_chunk_size(tokens, hdim, vocab)
    _assert_labels_in_range(labels, vocab, ignore_index)
    low_precision = weight.dtype != torch.float32
    compute_grad = grad_hidden_needed or grad_weight_needed

    loss_rows = torch.empty((tokens,), dtype=torch.float32, device=dev)  # [T]
    grad_hidden = torch.empty((tokens, hdim) if grad_hidden_needed else (0,), dtype=hidden.dtype, device=dev)
    # [V, H] fp32: the first chunk overwrites it (beta=0), so it is zero-filled only if there is none.
    alloc = torch.empty if tokens else torch.zeros
    grad_weight_acc = alloc((vocab, hdim) if grad_weight_needed else (0,), dtype=torch.float32, device=dev)

    for c0 in range(0, tokens, chunk_size):
        c1 = min(c0 + chunk_size, tokens)
        h_c = hidden[c0:c1]  # [C, H]
        logits = _mm_fp32_out(h_c, weight.t())  # [C, H] @ [H, V] -> [C, V] fp32
        # dloss/dlogits [C, V] in the operands' dtype: over the logits when fp32.
        g = None
        if compute_grad:
            g = torch.empty_like(logits, dtype=weight.dtype) if low_precision else logits
        cross_entropy_rows(logits, labels[c0:c1], ignore_index, loss_rows[c0:c1], g)
        if grad_hidden_needed:
            torch.mm(g, weight, out=grad_hidden[c0:c1])  # [C, V] @ [V, H] -> [C, H]
        if grad_weight_needed:
            _addmm_fp32_(grad_weight_acc, g.t(), h_c, beta=0.0 if c0 == 0 else 1.0)  # += [V, C] @ [C, H]
        del logits, g

    loss_sum = loss_rows.sum()  # [] fp32, deterministic
    n_targets = (labels != ignore_index).sum()  # [] int64
    if grad_weight_needed:
        grad_weight = grad_weight_acc.to(weight.dtype)  # the fp32 accumulator itself when fp32
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
    chunk_size: tokens per chunk (default: logits chunk about the size of hidden).
    Under torch.autocast, hidden and weight are cast to the autocast dtype first; the
    logits are fp32 either way."""
    hdim = hidden.shape[-1]
    h2 = hidden.reshape(-1, hdim)  # [..., H] -> [T, H]
    y = labels.reshape(-1)  # [...] -> [T]
    if y.shape[0] != h2.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device_type = h2.device.type
    if torch.is_autocast_enabled(device_type):
        # The operands a matmul gets under autocast; the op then runs with autocast off (fp32
        # logits). The casts are in the autograd graph: gradients return in the inputs' dtypes.
        dtype = torch.get_autocast_dtype(device_type)
        h2, weight = h2.to(dtype), weight.to(dtype)
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
