"""One training step of a LLaMA-3-8B-shaped model: lima-core against transformers.

Both sides get the same weights and the same tokens (one sequence of T tokens, so the same
attention work), run forward, backward and a torch AdamW step, and are timed over the same
rounds. lima-core: its Llama with its ops (Triton kernels on CUDA, references on CPU), the
fused linear + cross-entropy. transformers: LlamaForCausalLM with SDPA attention and its own
loss. The ratio is tokens/s of lima-core over tokens/s of transformers; on CUDA, peak memory
of a step is recorded for both.

Shapes: on CUDA, LLaMA-3-8B widths (hidden 4096, 32 query / 8 key-value heads, MLP 14336,
vocab 128256) with fewer layers (LAYERS) so one GPU holds it; on CPU a small model, since CPU
timings only smoke-test the harness.
"""

import pytest
import torch

from lima_core.checkpoint.hf import config_to_hf, hf_key
from lima_core.model.llama import Llama
from lima_core.model.shapes import ModelConfig

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
LAYERS = 4 if CUDA else 2
TOKENS = 8192 if CUDA else 512
SHAPE = (dict(dim=4096, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256, rope_theta=500000.0)
         if CUDA else dict(dim=256, n_heads=8, n_kv_heads=2, ffn_dim=688, vocab_size=8000))


def _models():
    cfg = ModelConfig(n_layers=LAYERS, max_seq_len=TOKENS, **SHAPE)
    with torch.device(DEVICE):
        ours = Llama(cfg)
    ours.init_weights(torch.Generator(DEVICE).manual_seed(0))
    ours.to(DTYPE)
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**{k: v for k, v in config_to_hf(cfg, DTYPE).items() if k != "architectures"})
    with torch.device(DEVICE):
        theirs = LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa", dtype=DTYPE)
    theirs.load_state_dict({hf_key(k): v for k, v in ours.state_dict().items()}, strict=False)
    return ours, theirs


def _step_fns():
    ours, theirs = _models()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, SHAPE["vocab_size"], (1, TOKENS), generator=g).to(DEVICE)
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = -100
    cu = torch.tensor([0, TOKENS], dtype=torch.int32, device=DEVICE)
    positions = torch.arange(TOKENS, device=DEVICE)[None]
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-6, fused=CUDA, foreach=not CUDA)
            for name, m in (("lima-core", ours), ("transformers", theirs))}

    def lima_step():
        loss_sum, n = ours(tokens, labels, positions=positions, cu_seqlens=cu, max_seqlen=TOKENS)
        (loss_sum / n).backward()
        opts["lima-core"].step()
        opts["lima-core"].zero_grad(set_to_none=True)

    def hf_step():
        # transformers shifts labels itself: pass the tokens as labels.
        theirs(tokens, labels=tokens).loss.backward()
        opts["transformers"].step()
        opts["transformers"].zero_grad(set_to_none=True)

    return {"lima-core": lima_step, "transformers": hf_step}


def _synchronized(fn):
    def run():
        fn()
        if CUDA:
            torch.cuda.synchronize()
    return run


@pytest.fixture(scope="module")
def steps():
    return _step_fns()


@pytest.mark.parametrize("impl", ["transformers", "lima-core"])
def test_train_step(benchmark, steps, impl, device):
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    benchmark.group = (f"train step: {LAYERS} layers, hidden {SHAPE['dim']}, vocab {SHAPE['vocab_size']}, "
                       f"{TOKENS} tokens")
    benchmark.pedantic(_synchronized(steps[impl]), rounds=5, warmup_rounds=2, iterations=1)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(median_s=seconds, tokens_per_s=TOKENS / seconds, device=device, dtype=str(DTYPE))
    if CUDA:
        benchmark.extra_info["peak_step_bytes"] = torch.cuda.max_memory_allocated() - base
    tps = steps.setdefault("_tokens_per_s", {})
    tps[impl] = TOKENS / seconds
    if impl == "lima-core" and "transformers" in tps:
        ratio = tps["lima-core"] / tps["transformers"]
        benchmark.extra_info["speedup_vs_transformers"] = ratio
        print(f"\ntrain step on {device}: lima-core {tps['lima-core']:.0f} tok/s, "
              f"transformers {tps['transformers']:.0f} tok/s, ratio {ratio:.2f}")
