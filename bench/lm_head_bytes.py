"""HBM bytes the LM head (lima_kernels' linear_cross_entropy) moves in one training step,
forward + backward, at LLaMA-3-70B-like shapes: tokens T = 16384, vocab V = 128256, hidden
H = 8192, bf16 hidden and weight. A static model, counted from the kernels the op launches;
nothing is measured.

Rule: every kernel (cuBLAS GEMM, the Triton cross-entropy kernel, a torch elementwise op)
reads each operand from HBM once and writes each output once; nothing stays in L2 from one
kernel to the next. O(T) traffic (labels, per-token losses, the label check: < 1 MB here)
is left out. The chunk is the op's default (`default_chunk_size`: 523 rows here, 32 chunks).

Schemes, per chunk of C tokens (hidden_c [C, H]):
  before (the op until issue 10): logits GEMM -> fp32 [C, V]; the kernel reads it twice
    and writes the fp32 gradient over it; a cast to bf16 (read fp32, write bf16);
    grad_hidden GEMM; grad_weight in 2**24-element vocab blocks, each a GEMM into an fp32
    temporary (re-reading hidden_c) and an add into the fp32 accumulator (read both, write);
    the accumulator zero-filled at the start and cast to bf16 at the end.
  after: the kernel writes the gradient in bf16 itself; grad_weight is one GEMM a chunk that
    adds into the fp32 accumulator as it writes (cuBLAS beta = 1: reads and writes it once;
    beta = 0 on the first chunk: no read, no zero-fill).
  Both: backward scales the saved gradients by d(loss): read and write each once.
  minimum: read hidden and weight once, write grad_hidden and grad_weight once (bf16); and
    since the GEMMs are cuBLAS's, the logits pass through HBM: fp32 logits written once and
    read once, their bf16 gradient written once and read by each of the two backward GEMMs.
    Per-chunk re-reads are not in it: they are the price of chunking, not of the head.

Run: .venv/bin/python bench/lm_head_bytes.py (prints the tables; bench/README.md has them).
"""

from __future__ import annotations

import math

from lima_kernels.ops.linear_cross_entropy import default_chunk_size

TOKENS, VOCAB, HIDDEN = 16384, 128256, 8192
BF16, FP32 = 2, 4
HBM_BYTES_PER_S = 3.35e12  # H100 SXM HBM3, NVIDIA's spec sheet (not measured)
BF16_FLOPS = 989e12  # H100 SXM dense bf16 tensor-core peak, spec sheet (not measured)
OLD_TEMP_ELEMS = 2**24  # the before-scheme's fp32 grad_weight temporary, in elements


def head_bytes(scheme: str, tokens: int = TOKENS, vocab: int = VOCAB, hidden: int = HIDDEN,
               chunk: int | None = None) -> dict[str, int]:
    """{what: bytes} of one forward + backward of the head; scheme "before", "after" or
    "minimum". chunk: rows per chunk (default: the op's own choice)."""
    T, V, H = tokens, vocab, hidden
    if scheme == "minimum":
        return {
            "read hidden and weight": (T * H + V * H) * BF16,
            "write grad_hidden and grad_weight": (T * H + V * H) * BF16,
            "fp32 logits: written, read once": T * V * FP32 * 2,
            "bf16 logits gradient: written, read by 2 GEMMs": T * V * BF16 * 3,
        }
    chunk = chunk or default_chunk_size(T, H, V)
    n = math.ceil(T / chunk)  # chunks; the sums over chunks of C are T
    weight_per_gemm = n * V * H * BF16  # each GEMM reads the whole weight once a chunk
    terms = {
        "logits GEMM (hidden, weight -> fp32 logits)": T * H * BF16 + weight_per_gemm + T * V * FP32,
        "grad_hidden GEMM (gradient, weight -> bf16)": T * V * BF16 + weight_per_gemm + T * H * BF16,
        "backward: scale both saved gradients": 2 * (T * H + V * H) * BF16,
        "accumulator: final cast to bf16": V * H * (FP32 + BF16),
    }
    if scheme == "before":
        blocks = math.ceil(V / max(1, OLD_TEMP_ELEMS // H))  # vocab blocks a chunk
        terms |= {
            "cross-entropy kernel (2 reads, gradient out)": T * V * FP32 * 3,
            "cast gradient fp32 -> bf16": T * V * (FP32 + BF16),
            "grad_weight GEMMs into fp32 temporaries": T * V * BF16 + blocks * T * H * BF16 + n * V * H * FP32,
            "add temporaries into fp32 accumulator": n * V * H * FP32 * 3,
            "accumulator: zero-fill": V * H * FP32,
        }
    elif scheme == "after":
        terms |= {
            "cross-entropy kernel (2 reads, gradient out)": T * V * (2 * FP32 + BF16),
            # The accumulator is written by every chunk and read by all but the first (beta = 0).
            "grad_weight GEMM adding into fp32 accumulator": (T * V + T * H) * BF16 + (2 * n - 1) * V * H * FP32,
        }
    else:
        raise ValueError(f"scheme must be 'before', 'after' or 'minimum', got {scheme!r}")
    return terms


def total(scheme: str, **shape) -> int:
    return sum(head_bytes(scheme, **shape).values())


def ms(nbytes: float) -> float:
    """Milliseconds to move nbytes at the H100 SXM spec bandwidth."""
    return nbytes / HBM_BYTES_PER_S * 1e3


def tables() -> str:
    """The summary, the before/after breakdown and the chunk-size sweep, as markdown."""
    chunk = default_chunk_size(TOKENS, HIDDEN, VOCAB)
    minimum = total("minimum")
    flops = 6 * TOKENS * HIDDEN * VOCAB  # 2 forward GEMM + 4 backward, per T*H*V
    lines = [
        f"T = {TOKENS}, V = {VOCAB}, H = {HIDDEN}, bf16; chunk {chunk} rows "
        f"({math.ceil(TOKENS / chunk)} chunks); GB = 1e9 bytes; time at 3.35 TB/s (H100 SXM spec)",
        "",
        "| scheme | HBM bytes | x minimum | time at 3.35 TB/s |",
        "| --- | --- | --- | --- |",
    ]
    for scheme in ("minimum", "before", "after"):
        b = total(scheme)
        lines.append(f"| {scheme} | {b / 1e9:.1f} GB | {b / minimum:.2f} | {ms(b):.1f} ms |")
    lines += [
        "",
        f"GEMM work for comparison: 6*T*H*V = {flops / 1e12:.0f} TFLOP, "
        f"{flops / BF16_FLOPS * 1e3:.0f} ms at 989 TFLOP/s (H100 SXM dense bf16 spec).",
        "",
        "| term | before | after |",
        "| --- | --- | --- |",
    ]
    before, after = head_bytes("before"), head_bytes("after")
    for name in sorted(before.keys() | after.keys(), key=lambda k: -before.get(k, 0)):
        lines.append(f"| {name} | {before.get(name, 0) / 1e9:.1f} GB | {after.get(name, 0) / 1e9:.1f} GB |")
    lines += [
        "",
        "| chunk rows | chunks | fp32 logits chunk | after | x minimum | time at 3.35 TB/s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for rows in (chunk, 1024, 2048, 4096, TOKENS):
        b = total("after", chunk=rows)
        lines.append(f"| {rows} | {math.ceil(TOKENS / rows)} | {rows * VOCAB * FP32 / 2**30:.2f} GiB | "
                     f"{b / 1e9:.1f} GB | {b / minimum:.2f} | {ms(b):.1f} ms |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(tables())
