"""An OpenAI-compatible HTTP server for a checkpoint: chat completions, plain and streamed.

    python -m lima_core.serve --checkpoint runs/lima/epoch-5 [--host 127.0.0.1] [--port 8000]
    torchrun --nproc_per_node N -m lima_core.serve --checkpoint ...   (a model bigger than one GPU)

The command line: it loads the checkpoint and serves it (lima_core.inference.serve: the HTTP API,
the continuous-batching engine over the decode core), on this machine only unless --host says
otherwise. Under torchrun the ranks of the node hold one tensor-parallel copy, each reading only
its slices of the files (lima_core.parallel.decode_layout); rank 0 answers HTTP and leads the
decoding, the others follow it step by step. docs/serving.md has the API.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI

from lima_core.checkpoint.hf import load_pretrained
from lima_core.config import DTYPES
from lima_core.data.tokenizer import Tokenizer
from lima_core.inference.serve.api import create_app
from lima_core.inference.serve.engine import Engine
from lima_core.parallel.decode_layout import load_tensor_parallel
from lima_core.parallel.distributed import Distributed, destroy_distributed, init_distributed


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lima_core.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="an HF-format folder (e.g. runs/lima/epoch-5)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                        help="dtype the weights are loaded and computed in (bf16 halves the memory)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-batch", type=int, default=16, help="most requests decoded together")
    parser.add_argument("--model-name", help="the model's id in the API (default: the checkpoint folder's name)")
    args = parser.parse_args(argv)
    if args.max_batch < 1:
        parser.error(f"--max-batch must be at least 1, got {args.max_batch}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    args.model_name = args.model_name or Path(args.checkpoint).resolve().name
    return args


def server_config(app: FastAPI, args: argparse.Namespace) -> uvicorn.Config:
    return uvicorn.Config(app, host=args.host, port=args.port, log_level="info")


def main(argv=None):
    args = parse_args(argv)
    ranks = init_distributed("cuda" if args.device.startswith("cuda") else "cpu")
    try:
        try:
            model, tokenizer = load(args, ranks), Tokenizer(args.checkpoint)
        except (FileNotFoundError, ValueError) as e:  # a bad checkpoint or tokenizer file, or a bad split
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        if ranks.rank != 0:
            follow(Engine(model, tokenizer, args.max_batch, ranks.group), ranks.rank)
            return
        app = create_app(model, tokenizer, model_name=args.model_name, max_batch=args.max_batch, group=ranks.group)
        spread = f" over {ranks.world} ranks (tensor-parallel)" if ranks.world > 1 else ""
        print(f"serving {args.model_name} ({args.checkpoint}, {args.dtype} on {args.device}{spread}, up to "
              f"{args.max_batch} requests a batch) at http://{args.host}:{args.port}/v1", flush=True)
        uvicorn.Server(server_config(app, args)).run()
    finally:
        destroy_distributed(ranks)


def follow(engine: Engine, rank: int):
    """A following rank: it stops when rank 0 says so (rank 0 gets the signals and ends the
    serving), or with one line when rank 0 is gone."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        engine.follow()
    except RuntimeError as e:  # the collective failed: the leading rank ended without saying so
        print(f"lima-core: rank {rank} stops: rank 0 is gone ({str(e).splitlines()[0][:120]})", file=sys.stderr)


def load(args: argparse.Namespace, ranks: Distributed):
    """The model: whole on one process; under torchrun, this rank's tensor-parallel share."""
    if ranks.world == 1:
        return load_pretrained(args.checkpoint, dtype=DTYPES[args.dtype], device=args.device)
    if ranks.topology.nodes > 1:
        raise ValueError(f"the server runs on one node; these {ranks.world} ranks are {ranks.topology.nodes} "
                         f"nodes (start it with torchrun --nproc_per_node N on one machine)")
    return load_tensor_parallel(args.checkpoint, ranks.comm, DTYPES[args.dtype], ranks.device)


if __name__ == "__main__":
    main()
