"""Rows per global batch: lima-core's packing against the old in-order one and the lower bound.

Every row is a micro-batch, and at 65B each costs a full parameter all-gather, so the step time
grows with the rows of a global batch. On the real LIMA set (1,000 conversations, LLaMA-2
tokenizer, ~700 tokens on average, ~6% past 2048 before truncation) the in-order packing made
~1.24x the rows needed.

The LIMA set stand-in: 1,000 lengths drawn with a fixed seed from a lognormal whose mean is
700 tokens and 6% of whose mass lies past 2048 (sigma 1.0345, mu = ln 700 - sigma^2 / 2; at
least 16 tokens: BOS, a short question, EOT, a short answer, EOT), truncated at max_len 2048
as encode_conversation truncates. The trainer's own batching (data.epoch_batches, seed 1234,
epochs 1-15, the short last batch included) at 32 and 64 conversations a step, packed by
data.pack and by the in-order packing it replaced; the lower bound of a batch is
ceil(its tokens / max_len). Target: data.pack's rows <= 1.03 x the bound, over all steps.
Deterministic; no timing (packing a batch takes well under a millisecond of a step).

    .venv/bin/python -m pytest bench/test_bench_packing.py -q -s
"""

import math
import random

import pytest

from lima_core.data.encode import IGNORE, Example
from lima_core.data.packing import epoch_batches, pack

MAX_LEN = 2048
CONVERSATIONS = 1000
EPOCHS = 15
DATA_SEED = 1234  # TrainConfig.seed's default: the epoch order
LENGTH_SEED = 0
MEAN, SIGMA, MIN_LEN = 700.0, 1.0345, 16
MU = math.log(MEAN) - SIGMA**2 / 2  # the lognormal's mean is exp(mu + sigma^2 / 2)
TARGET = 1.03


def lima_like_lengths() -> tuple[list[int], list[int]]:
    """(lengths before truncation, after truncation at MAX_LEN)."""
    rng = random.Random(LENGTH_SEED)
    raw = [max(MIN_LEN, round(rng.lognormvariate(MU, SIGMA))) for _ in range(CONVERSATIONS)]
    return raw, [min(n, MAX_LEN) for n in raw]


def in_order_rows(lengths: list[int]) -> int:
    """Rows of the packing lima-core used before: a row closes when the next example would overflow."""
    rows, used = 0, MAX_LEN + 1
    for n in lengths:
        if used + n > MAX_LEN:
            rows, used = rows + 1, 0
        used += n
    return rows


@pytest.mark.parametrize("batch_size", [32, 64])
def test_rows_per_batch(batch_size):
    raw, lengths = lima_like_lengths()
    examples = [Example([0] * n, [IGNORE] * n) for n in lengths]
    steps = bound = greedy = packed = 0
    for epoch in range(1, EPOCHS + 1):
        for batch in epoch_batches(examples, batch_size, epoch, DATA_SEED):
            batch_lengths = [len(e.ids) for e in batch]
            rows = pack(batch, MAX_LEN)
            assert max(r.tokens.shape[1] for r in rows) <= MAX_LEN
            assert sum(r.tokens.shape[1] for r in rows) == sum(batch_lengths)
            steps += 1
            bound += math.ceil(sum(batch_lengths) / MAX_LEN)
            greedy += in_order_rows(batch_lengths)
            packed += len(rows)
    print(f"\nlengths: lognormal mu {MU:.4f} sigma {SIGMA} (seed {LENGTH_SEED}, >= {MIN_LEN}): "
          f"mean {sum(raw) / len(raw):.0f} before truncation, {sum(lengths) / len(lengths):.0f} after; "
          f"{sum(n > MAX_LEN for n in raw) / len(raw):.1%} past {MAX_LEN}")
    print(f"batch {batch_size}: {steps} steps over {EPOCHS} epochs; rows per step: bound {bound / steps:.2f}, "
          f"in order {greedy / steps:.2f} ({greedy / bound:.3f}x), pack {packed / steps:.2f} ({packed / bound:.3f}x)")
    assert packed <= TARGET * bound, f"pack makes {packed / bound:.3f}x the bound, target <= {TARGET}x"
