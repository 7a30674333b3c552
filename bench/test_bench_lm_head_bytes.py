"""The LM head's byte model (lm_head_bytes.py) under pytest: a static count, no device, so it
runs anywhere; `pytest -s` prints the tables (bench/README.md quotes them)."""

import math

from lm_head_bytes import BF16, FP32, HIDDEN, TOKENS, VOCAB, default_chunk_size, tables, total


def test_lean_head_moves_fewer_bytes_than_before_and_stays_near_the_minimum():
    print("\n" + tables())
    minimum = total("minimum")
    for chunk in (None, 1024, TOKENS):  # the op's default (523 rows here), and larger
        assert total("after", chunk=chunk) < total("before", chunk=chunk), chunk

    # One chunk: every byte beyond the minimum is at most one more pass over a tensor the
    # minimum already moves (the kernel's second read of the fp32 logits, the second GEMM
    # read of hidden and of weight, the fp32 accumulator's write and cast in place of the
    # bf16 grad_weight write, backward's scaling of both gradients): under 2x.
    assert total("after", chunk=TOKENS) <= 2 * minimum
    # Each further chunk re-reads [V, H] tensors, the price of chunking over tokens: the
    # weight in both GEMMs (bf16) and the fp32 accumulator read and written by the add.
    chunks = math.ceil(TOKENS / default_chunk_size(TOKENS, HIDDEN, VOCAB))
    per_chunk = (2 * BF16 + 2 * FP32) * VOCAB * HIDDEN
    assert total("after") <= 2 * minimum + (chunks - 1) * per_chunk
