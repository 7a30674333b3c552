"""`python -m lima_core.data stats FILE.jsonl [--tokenizer PATH] [--max-len 2048] [--batch-size 64]`:
what a training set looks like to the trainer before any training (conversations, tokens,
targets, truncation, packing efficiency), stopping on a bad line as the trainer does.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

from lima_core.data.encode import encode_conversation, has_target, truncate
from lima_core.data.formats import Conversation, DataError, read_conversations
from lima_core.data.packing import epoch_batches, pack
from lima_core.data.tokenizer import BUNDLED_TOKENIZER, Tokenizer, TokenizerError


def stats(conversations: list[Conversation], tokenizer, max_len: int, batch_size: int, seed: int) -> str:
    """What the trainer will make of the data, as lines of text: sizes, token lengths (nearest-rank
    percentiles), truncation, and rows per global batch after packing against the lower bound."""
    whole = [encode_conversation(tokenizer, c, sys.maxsize) for c in conversations]
    examples = [truncate(e, max_len) for e in whole]
    lengths = sorted(len(e.ids) for e in whole)

    def percentile(p):
        return lengths[math.ceil(p / 100 * len(lengths)) - 1]

    lost = [c.line for c, e in zip(conversations, examples) if not has_target(e)]
    truncated = sum(n > max_len for n in lengths)
    turns = sum(len(c.turns) for c in conversations)
    batches = epoch_batches(examples, batch_size, 1, seed)
    rows = [len(pack(batch, max_len)) for batch in batches]
    bounds = [math.ceil(sum(len(e.ids) for e in batch) / max_len) for batch in batches]
    shown = ", ".join(map(str, lost[:10])) + (", ..." if len(lost) > 10 else "")
    return "\n".join([
        f"conversations: {len(conversations)} ({sum(len(c.turns) > 2 for c in conversations)} multi-turn, "
        f"{sum(c.system is not None for c in conversations)} with a system turn)",
        f"turns: {turns} user and assistant turns, {turns // 2} exchanges",
        f"tokens: min {lengths[0]}, mean {statistics.fmean(lengths):.1f}, p50 {percentile(50)}, p90 {percentile(90)}, "
        f"p99 {percentile(99)}, max {lengths[-1]}",
        f"truncated at --max-len {max_len}: {truncated} ({100 * truncated / len(lengths):.1f}%)",
        f"lose every target: {len(lost)}" + (f" (lines {shown})" if lost else ""),
        f"rows per batch of {batch_size}: mean {statistics.fmean(rows):.2f} after packing, lower bound "
        f"{statistics.fmean(bounds):.2f} ({len(batches)} batch{'es' * (len(batches) > 1)}, seed {seed})",
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lima_core.data", description="Look at training data.")
    commands = parser.add_subparsers(dest="command", required=True)
    stats_parser = commands.add_parser("stats", help="sizes, token lengths, truncation and packing of a JSONL file")
    stats_parser.add_argument("file", help="conversations, one JSON object a line")
    stats_parser.add_argument("--tokenizer", default=str(BUNDLED_TOKENIZER), help="tokenizer.model or tokenizer.json "
                              "(default: the bundled one)")
    stats_parser.add_argument("--max-len", type=int, default=2048, help="as the trainer's --max-len")
    stats_parser.add_argument("--batch-size", type=int, default=64, help="conversations a global batch")
    stats_parser.add_argument("--seed", type=int, default=1234, help="the trainer's --seed: the order of epoch 1")
    args = parser.parse_args(argv)
    if args.max_len < 2 or args.batch_size < 1:
        parser.error("--max-len must be at least 2 and --batch-size at least 1")
    try:
        report = stats(read_conversations(args.file), Tokenizer(args.tokenizer), args.max_len, args.batch_size,
                       args.seed)
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.file}\n{report}")

