"""Helpers shared by the tests: small checkpoints written by `transformers` itself (the
reference we test against), the one tiny lima-core model, the one torchrun launcher, the
error measure the parity targets are stated in, and the unsharded optimizer of the reference runs."""

import io
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import torch

from lima_core.data.encode import IGNORE, Example
from lima_core.model.llama import Llama
from lima_core.model.shapes import ModelConfig
from lima_core.train.optim import adamw

ROOT = Path(__file__).parents[1]
ASSETS = ROOT / "lima_core" / "assets"
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# The tiny test model: grouped-query attention, 3 blocks, a 101-token vocabulary.
TINY = dict(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=80, vocab_size=101, max_seq_len=128)


def tiny_model(seed: int = 0, kernels: str = "auto", **overrides) -> Llama:
    """The tiny model, initialised from `seed`, residual dropout off."""
    model = Llama(ModelConfig(**{**TINY, **overrides}), kernels=kernels)
    model.init_weights(torch.Generator().manual_seed(seed))
    model.set_residual_dropout(0.0)
    return model


def torchrun(n: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `torchrun --standalone --nproc_per_node n ARGS` from the repository root; fail on a non-zero exit."""
    # A worker script under tests/<area>/ imports these helpers: the tests folder goes on its path.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", str(n), *args],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result

# Shapes that exercise every code path: grouped-query attention, odd widths, a non-default
# rope_theta, LLaMA 3.1 rope scaling, tied and untied heads.
HF_CONFIGS = {
    "gqa-llama3-rope": dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                            num_attention_heads=6, num_key_value_heads=2, rope_theta=500000.0,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                            max_position_embeddings=128),
    "odd-tied": dict(vocab_size=97, hidden_size=36, intermediate_size=61, num_hidden_layers=3,
                     num_attention_heads=3, num_key_value_heads=3, rope_theta=12345.0, rms_norm_eps=1e-5,
                     tie_word_embeddings=True),
    "mqa-headdim": dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=12),
}


def make_hf_model(name: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**HF_CONFIGS[name], attn_implementation="eager")
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():  # norms start at one; random ones make the test see their use
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error in the 2-norm (the measure the parity targets are stated in)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def random_batches(n_steps: int, batch: int, vocab: int, seed: int = 0) -> list[list[Example]]:
    """Global batches of random examples, each with a random prompt (no loss) before its targets."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_steps):
        examples = []
        for _ in range(batch):
            n = int(torch.randint(4, 30, (1,), generator=g))
            ids = torch.randint(3, vocab, (n,), generator=g).tolist()
            prompt = int(torch.randint(1, n - 1, (1,), generator=g))  # loss only after the "prompt"
            labels = [IGNORE] * prompt + ids[prompt + 1:] + [IGNORE]
            examples.append(Example(ids, labels))
        out.append(examples)
    return out


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """An unsharded model's AdamW groups by the trainer's rule (FSDP.param_groups): weight decay on
    matrices (linear and embedding weights), none on norm weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float, **options):
    """lima-core's AdamW (train.optim.adamw) over an unsharded model: the reference runs of the
    training and FSDP tests."""
    return adamw(param_groups(model, weight_decay), lr, betas, **options)


# ---- bad inputs: a command's entry point run in-process, and what it wrote ----------------


@dataclass
class Outcome:
    """What a command-line entry point did: its exit status, its output, and the files under
    the watched folder it created or changed."""

    status: int
    out: str
    err: str
    written: list[str]


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in folder.rglob("*") if p.is_file()}


def run_entry(main, argv: list[str], watch: Path) -> Outcome:
    """Call `main(argv)` (a module's command-line entry point) as the command line would, in
    this process: SystemExit gives the status (0 when main returns). An uncaught exception
    propagates, so a traceback fails the calling test."""
    before = _files(watch)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(argv)
            status = 0
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    after = _files(watch)
    written = sorted(name for name, stamp in after.items() if before.get(name) != stamp)
    return Outcome(status, out.getvalue(), err.getvalue(), written)


# ---- servers: an ASGI app on a free localhost port, in a thread --------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app):
    """`app` served by uvicorn in a thread on a free localhost port; yields its URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
