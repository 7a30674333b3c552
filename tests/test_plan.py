"""The plan against measurement on the tiny model on CPU: per-rank parameter, gradient and
optimizer bytes equal what the ranks hold; the activation estimate is within 20% of the bytes
autograd saves (measured with saved_tensors_hooks, unique storages, parameters excluded)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from lima_core.config import ModelConfig
from lima_core.model import Llama
from lima_core.plan import plan

sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import TINY  # noqa: E402
from test_fsdp import torchrun  # noqa: E402


def test_shard_bytes_equal_what_the_ranks_hold(tmp_path):
    cfg = ModelConfig(**TINY)
    torchrun(2, "tests/dist_worker.py", str(tmp_path / "two"), "ours")
    for rank in range(2):
        held = json.loads((tmp_path / "two" / f"bytes-{rank}.json").read_text())
        p = plan(cfg, 2, param_dtype="fp32")
        print(f"\n2 ranks, rank {rank}: held {held}, plan params {p.params} grads {p.grads} optimizer {p.optimizer}")
        assert (held["params"], held["grads"], held["optimizer"]) == (p.params, p.grads, p.optimizer)


def saved_bytes(model, tokens) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, tokens)
    return sum(n for ptr, n in seen.items() if ptr not in params)


def test_activation_estimate_without_checkpointing_is_within_20_percent():
    for shape in (TINY, dict(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, ffn_dim=512, vocab_size=1024)):
        cfg = ModelConfig(**shape)
        model = Llama(cfg)
        model.init_weights()
        measured = saved_bytes(model, torch.randint(0, cfg.vocab_size, (1, 256)))
        estimate = plan(cfg, 1, seq=256, checkpointing="none", param_dtype="fp32").activations
        print(f"\n{shape['dim']}-wide: measured {measured} B saved for backward, plan {estimate} B")
        assert abs(estimate - measured) / measured < 0.2  # the stated tolerance


def test_the_command_line_prints_a_plan():
    out = subprocess.run([sys.executable, "-m", "lima_core.plan", "--model", "llama-65b", "--gpus", "64",
                          "--gpu-memory", "80"], capture_output=True, text=True, check=True).stdout
    assert "smallest cluster that fits" in out and "LIMA" in out
