"""Chat with a checkpoint: one prompt, or a multi-turn conversation on stdin.

    python -m lima_core.generate --checkpoint runs/lima/epoch-5 --prompt "How do I boil an egg?"
    python -m lima_core.generate --checkpoint runs/lima/epoch-5 --chat
"""

from __future__ import annotations

import argparse
import sys

import torch

from lima_core.hf import load_pretrained
from lima_core.sampling import answer
from lima_core.tokenizer import Tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lima_core.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="an HF-format folder (e.g. runs/lima/epoch-5)")
    parser.add_argument("--prompt", help="one user message; without it, --chat reads messages from stdin")
    parser.add_argument("--chat", action="store_true", help="multi-turn conversation on stdin (empty line ends)")
    parser.add_argument("--max-new-tokens", type=int, default=2048)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repetition-penalty", type=float, default=1.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not args.prompt and not args.chat:
        parser.error("give --prompt TEXT or --chat")

    model = load_pretrained(args.checkpoint, device=args.device)
    tokenizer = Tokenizer(args.checkpoint)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty,
                    generator=torch.Generator(args.device).manual_seed(args.seed))
    turns = [args.prompt] if args.prompt else []
    if turns:
        reply = answer(model, tokenizer, turns, **sampling)
        print(reply)
        turns.append(reply)
    while args.chat:
        print("you> ", end="", flush=True)
        line = sys.stdin.readline().strip()
        if not line:
            break
        turns.append(line)
        reply = answer(model, tokenizer, turns, **sampling)
        print(f"lima> {reply}")
        turns.append(reply)


if __name__ == "__main__":
    main()
