"""Chat with a checkpoint: one prompt, or a multi-turn conversation on stdin.

    python -m lima_core.chat --checkpoint runs/lima/epoch-5 --prompt "How do I boil an egg?"
    python -m lima_core.chat --checkpoint runs/lima/epoch-5 --chat

Sampling defaults are LIMA's (lima_core.config.SamplingConfig); every field is a flag.
"""

from __future__ import annotations

import argparse
import sys

import torch

from lima_core.checkpoint.hf import load_pretrained
from lima_core.cli import add_flags, config_from_args
from lima_core.config import DTYPES, ConfigError, SamplingConfig
from lima_core.data.tokenizer import Tokenizer
from lima_core.inference.decode import answer


def parse_args(argv=None) -> tuple[argparse.Namespace, SamplingConfig]:
    parser = argparse.ArgumentParser(prog="python -m lima_core.chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="an HF-format folder (e.g. runs/lima/epoch-5)")
    parser.add_argument("--prompt", help="one user message; without it, --chat reads messages from stdin")
    parser.add_argument("--chat", action="store_true", help="multi-turn conversation on stdin (empty line ends)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                        help="dtype the weights are loaded and computed in (bf16 halves the memory)")
    add_flags(parser, ["sampling"])
    args = parser.parse_args(argv)
    if not args.prompt and not args.chat:
        parser.error("give --prompt TEXT or --chat")
    try:
        return args, config_from_args(args).sampling
    except ConfigError as e:
        parser.error(str(e))


def main(argv=None):
    args, sampling = parse_args(argv)
    try:
        converse(args, sampling)
    except (FileNotFoundError, ValueError) as e:  # a bad checkpoint, or a prompt beyond the context
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def converse(args: argparse.Namespace, sampling: SamplingConfig):
    """Answer --prompt, then (with --chat) each line of stdin, keeping the whole conversation."""
    model = load_pretrained(args.checkpoint, dtype=DTYPES[args.dtype], device=args.device)
    tokenizer = Tokenizer(args.checkpoint)
    settings = dict(sampling.model_dump(), generator=torch.Generator(args.device).manual_seed(args.seed))
    turns = [args.prompt] if args.prompt else []
    if turns:
        reply = answer(model, tokenizer, turns, **settings)
        print(reply)
        turns.append(reply)
    while args.chat:
        print("you> ", end="", flush=True)
        line = sys.stdin.readline().strip()
        if not line:
            break
        turns.append(line)
        reply = answer(model, tokenizer, turns, **settings)
        print(f"lima> {reply}")
        turns.append(reply)


if __name__ == "__main__":
    main()
